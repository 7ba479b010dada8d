"""The patching benchmark runs and both implementations agree (not timed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_patching.py"
    spec = importlib.util.spec_from_file_location("bench_patching", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_patching"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_runs_and_agrees(capsys):
    bench = _load_bench()
    cfg = bench.BenchConfig(
        n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=40, batch=4, pos=6, chunk_rows=40
    )
    r = bench.run_benchmark(cfg, "cpu", baseline=True)
    assert r["shape"] == (2, 6, 4)
    assert r["path"] == "fast-last"  # the benchmark exercises the fast path
    assert r["variant"] == "positions-skip"  # "auto" on a CPU
    assert r["max_abs_value"] > 1e-3
    assert r["max_abs_diff"] <= 1e-4
    assert r["max_abs_diff_generic"] <= 1e-4  # the generic baseline agrees too
    assert r["t_ours_s"] > 0 and r["t_transformer_lens_s"] > 0 and r["t_generic_s"] > 0
    assert abs(r["speedup_vs_generic"] - r["t_generic_s"] / r["t_ours_s"]) < 1e-9


def test_benchmark_cli_rejects_missing_cuda(monkeypatch):
    bench = _load_bench()
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        bench.main(["--device", "cuda", "--quick"])


def test_benchmark_cli_rejects_two_sizes():
    bench = _load_bench()
    with pytest.raises(SystemExit, match="one of --quick and --mid"):
        bench.main(["--device", "cpu", "--quick", "--mid"])


def test_benchmark_sweep_times_each_variant_against_the_previous_path():
    bench = _load_bench()
    cfg = bench.BenchConfig(
        n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=40, batch=4, pos=6, chunk_rows=40
    )
    sweep = [("packed", 8), ("packed-sdpa", 4096), ("positions", 4096)]
    r = bench.run_benchmark(cfg, "cpu", sweep=sweep)
    rows = r["sweep"]
    # the previous fast path comes first (the reference) and is not timed twice
    assert [(x["variant"], x["chunk_rows"]) for x in rows] == [
        ("positions", 4096),
        ("packed", 8),
        ("packed-sdpa", 4096),
    ]
    assert rows[0]["speedup_vs_previous"] == 1.0
    for x in rows:
        assert x["max_abs_diff"] <= 1e-4
        assert abs(x["speedup_vs_tl"] - r["t_transformer_lens_s"] / x["t_s"]) < 1e-9
        assert abs(x["speedup_vs_previous"] - rows[0]["t_s"] / x["t_s"]) < 1e-9


def test_benchmark_cli_sweep_options(capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit, match="unknown --variant"):
        bench.main(["--device", "cpu", "--quick", "--variant", "packed,nope"])
    with pytest.raises(SystemExit, match="must be >= 1"):
        bench.main(["--device", "cpu", "--quick", "--variant", "packed", "--chunk-rows", "0"])
    args = bench.argparse.Namespace(sweep=True, variant=None, chunk_rows=None)
    entries = bench._sweep_entries(args)
    assert ("packed", 4096) in entries and ("positions", 16384) in entries
