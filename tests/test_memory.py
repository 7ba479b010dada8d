"""A worker's GPU memory (``subroutine_circuits.memory``), checked on the CPU: chunk sizes from a
budget, the out-of-memory back-off (injected ``torch.OutOfMemoryError``), chunked computations
equal to unchunked ones, worker placement on GPUs, the config key, and the per-job peak in the
manifest (None on the CPU). ``benchmarks/gpu_memory_check.py`` checks the same on a real GPU.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_tiny_transformer

from subroutine_circuits import memory
from subroutine_circuits.memory import (
    ChunkOutOfMemoryError,
    chunk_for_budget,
    job_memory,
    model_row_bytes,
    rows_per_pass,
    run_chunked,
    transformer_row_bytes,
    with_backoff,
)

OOM = torch.OutOfMemoryError


@pytest.fixture(autouse=True)
def _no_remembered_chunks():
    """Each test starts and ends without chunk sizes remembered from earlier back-offs."""
    memory._shrunk.clear()
    yield
    memory._shrunk.clear()


def _problems(n: int, pos: int, seed: int, min_len: int = 3):
    """Random OOO problems, right-padded with 0, lengths in [min_len, pos]."""
    from subroutine_circuits.adapters.base import EncodedProblems

    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, 50, (n, 4, pos), generator=g)
    lens = torch.randint(min_len, pos + 1, (n, 4), generator=g)
    toks = toks * (torch.arange(pos)[None, None, :] < lens[..., None])
    return EncodedProblems(
        {"tokens": toks, "lengths": lens}, torch.randint(0, 4, (n,), generator=g)
    )


# ----------------------------------------------------------------------------- the back-off
def test_run_chunked_halves_on_oom_and_equals_the_unchunked_result(caplog):
    """A computation that runs out of memory above 5 rows: the chunk goes 32 -> 16 -> 8 -> 4
    (one warning each, naming the new size), the finished chunks are kept, and the result is
    the unchunked one (exactly: integer arithmetic; and float rows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-50, 50, (37, 6), generator=g)
    w = torch.randint(-5, 5, (6, 3), generator=g)
    sizes: list[int] = []

    def rows(part: range) -> torch.Tensor:
        sizes.append(len(part))
        if len(part) > 5:
            raise OOM("CUDA out of memory (injected)")
        return x[part.start : part.stop] @ w

    with caplog.at_level(logging.WARNING, logger="subroutine_circuits.memory"):
        parts = run_chunked(rows, range(37), 32, label="rows")
    assert torch.equal(torch.cat(parts), x @ w)
    assert sizes == [32, 16, 8] + [4] * 9 + [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "32 rows per chunk" in warnings[0] and warnings[0].endswith("retrying with 16")
    assert warnings[-1].endswith("retrying with 4")

    xf = torch.randn(37, 6, generator=g)
    parts = run_chunked(lambda p: torch.tanh(xf[p.start : p.stop]).sum(1), range(37), 32)
    torch.testing.assert_close(torch.cat(parts), torch.tanh(xf).sum(1))
    # a plain sequence: fn gets its slices
    assert run_chunked(lambda s: [v * 2 for v in s], [1, 2, 3, 4, 5], 2) == [[2, 4], [6, 8], [10]]


def test_chunk_of_one_that_still_ooms_raises_a_clear_error():
    """At chunk 1 the error is ChunkOutOfMemoryError (a torch.OutOfMemoryError, so enclosing
    chunked loops halve in turn) naming the items and what to change."""

    def always(part):
        raise OOM("CUDA out of memory (injected)")

    with pytest.raises(ChunkOutOfMemoryError, match=r"even with chunks of 1 \(problems\)") as e:
        run_chunked(always, range(10), 8, label="problems", key="site")
    assert isinstance(e.value, OOM)
    assert "gpu_memory_gb" in str(e.value) and "(site)" in str(e.value)
    with pytest.raises(ChunkOutOfMemoryError):
        with_backoff(lambda n: always(n), 4)
    # other errors pass through untouched, without retries
    calls = []

    def bad(part):
        calls.append(len(part))
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        run_chunked(bad, range(10), 8)
    assert calls == [8]


def test_nested_chunked_loops_halve_the_outer_chunk_when_the_inner_reaches_one():
    """Problems x masks (as fixed_mask_scores): a pass fits 6 rows. The inner loop (masks) gives
    up at 1 mask with 8 problems; the outer (problems) then halves, and the filled table equals
    the unchunked one."""
    a = torch.arange(10.0)[:, None] * torch.arange(1.0, 8.0)[None, :]  # [problems, masks]
    out = torch.zeros_like(a)
    passes: list[tuple[int, int]] = []

    def problems(pr: range) -> None:
        def masks(kr: range) -> None:
            passes.append((len(pr), len(kr)))
            if len(pr) * len(kr) > 6:
                raise OOM("injected")
            out[pr.start : pr.stop, kr.start : kr.stop] = a[pr.start : pr.stop, kr.start : kr.stop]

        run_chunked(masks, range(7), 4, label="masks")

    run_chunked(problems, range(10), 8, label="problems")
    assert torch.equal(out, a)
    assert passes[:6] == [(8, 4), (8, 2), (8, 1), (4, 4), (4, 2), (4, 1)]


def test_with_backoff_retries_the_whole_computation_with_half_the_chunk():
    tried: list[int] = []

    def plan(chunk: int) -> int:
        tried.append(chunk)
        if chunk > 3:
            raise OOM("injected")
        return chunk * 100

    assert with_backoff(plan, 20, label="rows") == 200
    assert tried == [20, 10, 5, 2]


def test_a_shrunk_chunk_is_remembered_per_call_site():
    """After a back-off at one call site (``key``) its later calls start at the smaller size;
    other sites are unaffected."""
    sizes: list[int] = []

    def limited(part: range) -> int:
        sizes.append(len(part))
        if len(part) > 5:
            raise OOM("injected")
        return len(part)

    run_chunked(limited, range(40), 32, key="site-a")
    sizes.clear()
    assert sum(run_chunked(limited, range(40), 32, key="site-a")) == 40
    assert sizes[0] == 4  # 32 * (4 / 32): no failed attempt this time
    sizes.clear()
    run_chunked(limited, range(40), 32, key="site-b")
    assert sizes[0] == 32


# ----------------------------------------------------------------------------- chunk sizes
def test_chunk_size_from_budget_is_monotone_capped_and_never_zero():
    budgets = [0, 1, 999, 1000, 10_000, 1e6, 1e9, 1e12]
    chunks = [chunk_for_budget(b, 1000) for b in budgets]
    assert all(c >= 1 for c in chunks)
    assert chunks == sorted(chunks)  # less memory never gives a larger chunk
    assert chunks[:4] == [1, 1, 1, 1] and chunks[4] == 10
    assert chunk_for_budget(1e12, 1000, cap=256) == 256
    assert chunk_for_budget(0, 1e9, cap=256) == 1
    with pytest.raises(ValueError, match="bytes_per_item"):
        chunk_for_budget(1e9, 0)


def test_default_budget_divides_the_gpu_and_respects_free_memory(caplog):
    """min(8 GiB, 90% of the GPU / workers), lowered (with a warning) when less is free."""
    gib = memory.GIB
    assert memory.share_of_gpu(80 * gib, 1) == 8 * gib
    assert memory.share_of_gpu(80 * gib, 20) == int(0.9 * 80 * gib / 20)
    assert memory.share_of_gpu(80 * gib, 20) < memory.share_of_gpu(80 * gib, 10)
    with caplog.at_level(logging.WARNING, logger="subroutine_circuits.memory"):
        assert memory.share_of_gpu(80 * gib, 2, free=4 * gib) == int(0.9 * 4 * gib)
    assert "free at job start" in caplog.text
    assert memory.share_of_gpu(80 * gib, 2, free=70 * gib) == 8 * gib


def test_rows_per_pass_follows_the_budget(monkeypatch):
    """Sequences per pass: the cap on the CPU (no budget); with a budget, fewer for less
    memory, fewer with gradients, at least 1, at most the cap."""
    model = make_tiny_transformer(seed=0)
    assert memory.budget_bytes("cpu") is None
    assert rows_per_pass(model, 12, 777) == 777  # the CPU: unchanged call-site sizes
    per_row = model_row_bytes(model, 12)
    assert per_row is not None and per_row > 0
    assert model_row_bytes(model, 12, grad=True) > per_row
    assert model_row_bytes(torch.nn.Linear(3, 3), 12) is None  # no transformer config
    assert transformer_row_bytes(32, 256, 8, 1024, 4) > transformer_row_bytes(16, 256, 8, 1024, 4)
    assert transformer_row_bytes(16, 256, 8, 1024, 8, grad=True) > transformer_row_bytes(
        16, 256, 8, 1024, 4, grad=True
    )
    rows = []
    for budget in (0, 2**20, 2**24, 2**28, 2**34):
        monkeypatch.setattr(memory, "budget_bytes", lambda device, b=budget: b)
        r = rows_per_pass(model, 12, 4096)
        assert 1 <= r <= 4096
        assert rows_per_pass(model, 12, 4096, grad=True) <= r
        rows.append(r)
    assert rows == sorted(rows) and rows[0] == 1 and rows[-1] == 4096 and 1 < rows[2] < 4096


def test_job_memory_on_the_cpu_records_no_peak():
    with job_memory("cpu") as rec:
        torch.ones(10).sum()
    assert rec == {"peak_gpu_memory_gb": None, "gpu_memory_budget_gb": None}
    assert memory.budget_bytes("cpu") is None


# ----------------------------------------------------------------------------- call sites
def test_accuracy_backs_off_and_gives_the_same_accuracy(monkeypatch):
    """``ModelAdapter.accuracy`` with a forward pass that runs out of memory above 7 problems:
    the same accuracy as one pass."""
    from subroutine_circuits.adapters import as_adapter

    adapter = as_adapter(make_tiny_transformer(seed=1), pool="last")
    data = _problems(30, 9, seed=2)
    want = adapter.accuracy(data)
    real = adapter.ooo_logits

    def limited(inputs):
        if inputs["tokens"].shape[0] > 7:
            raise OOM("injected")
        return real(inputs)

    monkeypatch.setattr(adapter, "ooo_logits", limited)
    assert adapter.accuracy(data, batch_size=64) == want


def test_fixed_mask_scores_back_off_to_the_same_scores(monkeypatch):
    """Fixed-mask evaluation whose passes run out of memory above 24 sequences: halving masks,
    then problems, gives the scores of one pass (mean, position-aware ablation)."""
    from subroutine_circuits.adapters import as_adapter, padded, tl_unit_map
    from subroutine_circuits.experiment import batched
    from subroutine_circuits.masks.ablator import reference_ablator

    model = make_tiny_transformer(seed=2)
    adapter = as_adapter(model, pool="last")
    um = tl_unit_map(model)
    abl = reference_ablator(adapter, um, _problems(12, 9, seed=5).flat_inputs(), "mean")
    keep = torch.rand(5, um.n_units, generator=torch.Generator().manual_seed(0)) > 0.4
    data = _problems(11, 9, seed=3)
    want = batched.fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl)
    real, seen = padded.ooo_scores_padded, []

    def limited(model, tokens, lengths, pool, pad_state, *rest):
        seen.append(tokens.shape[0])
        if tokens.shape[0] > 6:  # problems x masks (each problem 4 sequences)
            raise OOM("injected")
        return real(model, tokens, lengths, pool, pad_state, *rest)

    monkeypatch.setattr(padded, "ooo_scores_padded", limited)
    got = batched.fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # masks halved to 1, then problems halved (the masks stay at the size remembered)
    assert seen[:4] == [11 * 5, 11 * 2, 11, 5]


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_mask_training_split_into_passes_equals_one_pass(monkeypatch, caplog, ablation):
    """Converged batched mask training whose K masks run in several forward/backward passes
    (forced small budget; and passes that run out of memory after drawing their exact noise,
    then retried) gives the masks of one pass: the ablation state is served per slice and the
    noise replayed."""
    from subroutine_circuits.adapters import as_adapter, padded, tl_unit_map
    from subroutine_circuits.experiment import converge
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.masks.ablator import reference_ablator

    model = make_tiny_transformer(seed=3)
    adapter = as_adapter(model, pool="last")
    um = tl_unit_map(model)
    train = [_problems(24, 9, seed=1), _problems(20, 9, seed=2, min_len=4)]
    val = [_problems(12, 9, seed=3), _problems(12, 9, seed=4)]
    cfg = MaskSearchConfig(steps=12, eval_every=3, patience=2, batch_size=5, lr=0.3,
                           min_density_drop=0.0)  # fmt: skip
    sched = converge.mask_schedule(cfg, 24)
    hps = [{"l0_weight": 0.0}, {"l0_weight": 30.0}, {"l0_weight": 30.0}, {"l0_weight": 3.0}]
    seeds, which = [0, 1, 2, 3], [0, 0, 1, 1]

    def train_all():
        abl = reference_ablator(adapter, um, _problems(16, 9, seed=5).flat_inputs(), ablation, 7)
        return converge.train_masks_converged(model, train, val, cfg, hps, seeds, sched, abl,
                                              "last", data_index=which, noise="exact")  # fmt: skip

    want = train_all()
    real, rows = padded.ooo_scores_padded, []

    def counted(model, tokens, lengths, pool, pad_state, *rest):
        if torch.is_grad_enabled():
            rows.append(tokens.shape[0])  # problems in the pass: masks x batch_size
        return real(model, tokens, lengths, pool, pad_state, *rest)

    monkeypatch.setattr(padded, "ooo_scores_padded", counted)
    monkeypatch.setattr(converge, "rows_per_pass", lambda m, pos, cap, grad=False: 2 * 5 * 4)
    # and the reference activations and resample's clean source pass in passes of 7 sequences
    monkeypatch.setattr(memory, "rows_per_pass", lambda m, pos, cap, grad=False: min(cap, 7))
    split = train_all()  # 2 masks per pass
    monkeypatch.undo()
    assert max(rows) == 2 * 5 and rows.count(10) > 1

    def oom_after_forward(model, tokens, lengths, pool, pad_state, *rest):
        out = real(model, tokens, lengths, pool, pad_state, *rest)  # the hooks drew their noise
        if torch.is_grad_enabled() and tokens.shape[0] > 5:  # more than one mask's slice
            raise OOM("injected")
        return out

    monkeypatch.setattr(padded, "ooo_scores_padded", oom_after_forward)
    with caplog.at_level(logging.WARNING, logger="subroutine_circuits.memory"):
        retried = train_all()  # all K at first, then backed off to one mask per pass
    assert any("masks per chunk" in r.getMessage() for r in caplog.records)
    for a in (split, retried):
        for w, g in zip(want, a):
            assert (g.steps, g.best_step) == (w.steps, w.best_step)
            assert g.val_acc == pytest.approx(w.val_acc)
            assert torch.equal(g.mask.flat_binary(), w.mask.flat_binary())


@pytest.mark.parametrize("fast", [False, True])
def test_activation_patching_backs_off_to_the_same_scores(monkeypatch, caplog, tiny_tokens, fast):
    """Activation patching (generic and fast per-position paths) whose passes over more than
    two copies of the batch run out of memory: the scores of unlimited passes."""
    from subroutine_circuits.adapters import tl_unit_map
    from subroutine_circuits.adapters.transformer_lens import TransformerLensAdapter
    from subroutine_circuits.patching import fast_forward
    from subroutine_circuits.patching.activation import activation_patching

    model = make_tiny_transformer(seed=4)
    clean, corr = tiny_tokens, tiny_tokens.clone()
    corr[:, 3] = (corr[:, 3] + 7) % 50

    def metric(logits):
        return logits[..., -1, 5] - logits[..., -1, 9]

    groups = tl_unit_map(model, kinds=("head",)).groups
    batch = clean.shape[0]

    def run():
        return activation_patching(model, clean, corr, metric, groups, per_position=fast,
                                   chunk_rows=4096, fast=fast)  # fmt: skip

    want = run()
    if fast:  # the fast path plans its passes from chunk_rows: fail while a pass is too wide
        real_fast = fast_forward.fast_head_patching_by_pos

        def limited_fast(adapter, c, k, m, g, r, chunk_rows, variant):
            if chunk_rows > 2 * batch:
                raise OOM("injected")
            return real_fast(adapter, c, k, m, g, r, chunk_rows, variant)

        monkeypatch.setattr("subroutine_circuits.patching.activation.fast_head_patching_by_pos",
                            limited_fast)  # fmt: skip
    else:
        real_run = TransformerLensAdapter.run_from_layer

        def limited(self, state, layer, readout):
            if state.shape[0] > 2 * batch:
                raise OOM("injected")
            return real_run(self, state, layer, readout)

        monkeypatch.setattr(TransformerLensAdapter, "run_from_layer", limited)
    with caplog.at_level(logging.WARNING, logger="subroutine_circuits.memory"):
        got = run()
    assert "retrying with" in caplog.text  # the injected errors were met and backed off
    assert want.extra["path"] == got.extra["path"]
    assert want.extra["path"].startswith("fast") == fast
    for h in want.patched:
        torch.testing.assert_close(got.patched[h], want.patched[h], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- workers, config
def test_workers_are_pinned_round_robin_and_know_who_shares_their_gpu():
    from subroutine_circuits.experiment.dask_executor import WORKERS_PER_GPU_ENV
    from subroutine_circuits.experiment.executors import gpu_assignment

    assert WORKERS_PER_GPU_ENV == memory.WORKERS_PER_GPU_ENV
    env = [gpu_assignment(i, 4, ["0"]) for i in range(4)]
    assert all(e == {"CUDA_VISIBLE_DEVICES": "0", WORKERS_PER_GPU_ENV: "4"} for e in env)
    env = [gpu_assignment(i, 3, ["2", "5"]) for i in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in env] == ["2", "5", "2"]
    assert [e[WORKERS_PER_GPU_ENV] for e in env] == ["2", "1", "2"]
    assert gpu_assignment(0, 2, []) == {}


def test_dask_gpu_workers_know_who_shares_their_gpu():
    pytest.importorskip("distributed")
    from subroutine_circuits.experiment.dask_executor import WORKERS_PER_GPU_ENV, worker_specs

    specs = worker_specs(2, 3)
    shares = {n: s["options"]["env"][WORKERS_PER_GPU_ENV] for n, s in specs.items()}
    assert shares == {"gpu0-w0": "2", "gpu1-w1": "1", "gpu0-w2": "2"}


def test_workers_per_gpu_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(memory.WORKERS_PER_GPU_ENV, "3")
    assert memory.workers_on_gpu() == 3
    monkeypatch.setenv(memory.WORKERS_PER_GPU_ENV, "x")
    assert memory.workers_on_gpu() == 1
    monkeypatch.delenv(memory.WORKERS_PER_GPU_ENV)
    assert memory.workers_on_gpu() == 1


def test_gpu_memory_gb_is_checked_and_resumable():
    from subroutine_circuits.experiment.config import config_from_dict
    from subroutine_circuits.experiment.runner import RESUMABLE_FIELDS

    assert config_from_dict({"gpu_memory_gb": 6}).gpu_memory_gb == 6.0
    assert config_from_dict({}).gpu_memory_gb is None
    with pytest.raises(ValueError, match="gpu_memory_gb must be > 0"):
        config_from_dict({"gpu_memory_gb": 0})
    with pytest.raises(ValueError, match="gpu_memory_gb is set but device is 'cpu'"):
        config_from_dict({"gpu_memory_gb": 4.0, "device": "cpu"})
    assert "gpu_memory_gb" in RESUMABLE_FIELDS


# ----------------------------------------------------------------------------- the manifest
def test_manifest_records_each_jobs_peak_gpu_memory(tmp_path):
    """A tiny study on the CPU: every base-model record, the manifest's per-model table and the
    per-worker table carry ``peak_gpu_memory_gb`` (None on the CPU)."""
    from subroutine_circuits.experiment import config_from_dict, run_experiment

    cfg = config_from_dict(
        {
            "task": "agreement_singular",
            "inits": ["trained"],
            "base_seeds": [0],
            "mask_seeds": [0],
            "min_composite_acc": 0.0,
            "patching": False,
            "data": {"n_train": 60, "n_val": 20, "n_test": 20, "corpus_size": 100},
            "train": {"max_steps": 10, "eval_every": 10},
            "mask": {"steps": 6, "grid": [{"l0_weight": 1.0}], "prune": False},
            "n_random": 20,
            "device": "cpu",
        }
    )
    run_experiment(cfg, tmp_path / "out", progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (record,) = manifest["timings"]["base_models"]
    assert "peak_gpu_memory_gb" in record and record["peak_gpu_memory_gb"] is None
    assert record["gpu_memory_budget_gb"] is None
    assert manifest["peak_gpu_memory_gb"] == {record["base_id"]: None}
    (worker,) = manifest["executor"]["per_worker"].values()
    assert "peak_gpu_memory_gb" in worker and worker["peak_gpu_memory_gb"] is None
