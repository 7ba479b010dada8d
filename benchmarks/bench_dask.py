"""Overhead of the Dask executor against the in-process executor, in one process.

Two measurements:

1. ``--jobs N`` no-op jobs (each returns its argument) through a Dask cluster vs a Python loop:
   the scheduler's cost per job, and the cluster's start-up time.
2. With ``--config CONFIG``: the same study run with ``executor = "inprocess"`` and with
   ``executor = "dask"`` (``--dask-workers`` workers, default one per GPU / 1 on CPU) into two
   fresh folders under ``--out``; prints the wall time and per-stage times of each (from their
   manifests), the ratio dask / in-process, and whether results.csv agree (verdict columns
   equal, numbers within 1e-6).

Run on a GPU node, e.g.::

    python benchmarks/bench_dask.py --config configs/paper_scale_probe.toml --out /tmp/bench_dask

CPU timings on a shared machine are inflated; report them with the load (``uptime``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def _noop(x):
    return x


def scheduler_overhead(n_jobs: int, workers: int | None) -> dict[str, float]:
    """Seconds per no-op job through Dask (cluster already up) and the cluster start-up."""
    from subroutine_circuits.experiment.dask_executor import dask_client, map_jobs

    t0 = time.perf_counter()
    with dask_client(n_workers=workers) as client:
        start = time.perf_counter() - t0
        list(map_jobs(client, _noop, list(range(8))))  # warm the workers
        t1 = time.perf_counter()
        out = sorted(r for _, r, _ in map_jobs(client, _noop, list(range(n_jobs))))
        per_job = (time.perf_counter() - t1) / n_jobs
    assert out == list(range(n_jobs))
    t2 = time.perf_counter()
    [_noop(i) for i in range(n_jobs)]
    loop = (time.perf_counter() - t2) / n_jobs
    ms = {"dask_per_job_ms": 1e3 * per_job, "loop_per_job_ms": 1e3 * loop}
    return {"cluster_start_s": start, **ms}


def run_study(config: str, out: Path, executor: str, dask_workers: int | None, device: str):
    """Run ``config`` with ``executor`` into a fresh ``out``; returns (results, manifest)."""
    from subroutine_circuits.experiment import load_config, run_experiment

    cfg = load_config(config)
    cfg.executor, cfg.scheduler, cfg.device = executor, None, device
    cfg.dask_workers = dask_workers if executor == "dask" else None
    shutil.rmtree(out, ignore_errors=True)
    df = run_experiment(cfg, out, progress=False)
    return df, json.loads((out / "manifest.json").read_text())


def compare(ref, got) -> str:
    """'identical', 'equal within 1e-6' or a description of the first difference."""
    import numpy as np

    if len(ref) != len(got):
        return f"different row counts {len(ref)} vs {len(got)}"
    if not ref["compositional"].equals(got["compositional"]):
        return "verdicts differ"
    num = ref.select_dtypes("number").columns
    a, b = ref[num].to_numpy(float), got[num].to_numpy(float)
    if np.array_equal(a, b, equal_nan=True):
        return "identical"
    diff = np.nanmax(np.abs(a - b))
    return "equal within 1e-6" if diff <= 1e-6 else f"numbers differ by up to {diff:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=200, help="no-op jobs for the scheduler overhead")
    p.add_argument("--config", default=None, help="a study config to run both ways")
    p.add_argument("--out", default="/tmp/bench_dask", help="folder for the two study runs")
    p.add_argument("--dask-workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    import torch

    from subroutine_circuits.experiment.dask_executor import count_gpus

    print(f"torch {torch.__version__}; GPUs {count_gpus()}; cores {os.cpu_count()}; "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    ov = scheduler_overhead(args.jobs, args.dask_workers)
    print(f"cluster start {ov['cluster_start_s']:.2f} s; per no-op job: dask "
          f"{ov['dask_per_job_ms']:.2f} ms, loop {ov['loop_per_job_ms']:.4f} ms")  # fmt: skip
    if not args.config:
        return
    out = Path(args.out)
    ref, m_ref = run_study(args.config, out / "inprocess", "inprocess", None, args.device)
    got, m_got = run_study(args.config, out / "dask", "dask", args.dask_workers, args.device)
    keys = ["wall_s", "base_model_s", "mask_search_s", "evaluation_s", "patching_s",
            "summary_s", "report_s"]  # fmt: skip
    print(f"{'':12}" + "".join(f"{k:>15}" for k in keys))
    for name, m in (("inprocess", m_ref), ("dask", m_got)):
        inv = m["invocations"][-1]
        print(f"{name:12}" + "".join(f"{inv.get(k, 0.0):>15.1f}" for k in keys))
    ratio = m_got["invocations"][-1]["wall_s"] / m_ref["invocations"][-1]["wall_s"]
    print(f"dask / inprocess wall: {ratio:.3f}; workers: {json.dumps(m_got['executor'])}")
    print(f"results.csv: {compare(ref, got)}")


if __name__ == "__main__":
    main()
