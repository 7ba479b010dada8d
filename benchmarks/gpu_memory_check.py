"""GPU memory of a worker, checked on a real GPU (issue 21): budget-sized chunks, the
out-of-memory back-off under a hard cap, and the peak memory recorded per job.

Checks (each prints what it saw and PASS / FAIL):

1. **Budget**: a chunked evaluation (``fixed_mask_scores`` of K masks, ``adapter.accuracy``) and
   a short batched mask training inside ``memory.job_memory(gpu_memory_gb=BUDGET)``: the chunk
   sizes come from the budget and the peak (``torch.cuda.max_memory_allocated``) stays under
   it, with the results of an unbounded reference run.
2. **Forced out-of-memory**: ``torch.cuda.set_per_process_memory_fraction`` caps the process a
   little above what is allocated (``--cap-mb``), and the same evaluation is asked for huge
   chunks (``max_rows`` / ``batch_size``); every out-of-memory error halves the chunk (the
   warnings are printed) and the scores equal the reference's. Then the mask training, forced
   to one pass of all K masks under the cap, backs off to fewer masks per pass and gives the
   reference's masks (exact noise replayed).
3. **Chunk of 1**: a model whose one problem needs more than the cap's headroom (2**20 MLP
   neurons): the error is a clear ``ChunkOutOfMemoryError`` (not a crash).
4. **Manifest** (skip with ``--no-study``): a tiny study on the GPU records
   ``peak_gpu_memory_gb`` for its base-model job.

Without CUDA the script says so and exits with status 0. Run::

    python benchmarks/gpu_memory_check.py                  # the small preset, pos 32
    python benchmarks/gpu_memory_check.py --preset base --problems 2000 --masks 64
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


class _Warnings(logging.Handler):
    """Collects the back-off warnings of ``subroutine_circuits.memory``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _problems(n: int, pos: int, vocab: int, seed: int, device: str):
    """Random OOO problems (right-padded, lengths in [pos // 2, pos]) on ``device``."""
    from subroutine_circuits.adapters.base import EncodedProblems

    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, vocab, (n, 4, pos), generator=g)
    lens = torch.randint(max(2, pos // 2), pos + 1, (n, 4), generator=g)
    toks = toks * (torch.arange(pos)[None, None, :] < lens[..., None])
    odd = torch.randint(0, 4, (n,), generator=g)
    return EncodedProblems({"tokens": toks, "lengths": lens}, odd).to(device)


def _report(name: str, ok: bool, detail: str) -> bool:
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    return ok


def _cap(extra_mb: float) -> float:
    """Cap this process at what is allocated now plus ``extra_mb``; returns the cap in GiB."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_allocated() + extra_mb * 2**20
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
    return cap / GIB


def _uncap() -> None:
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


def _train(model, train, val, abl, masks: int, seed: int = 0):
    """A short batched mask training of ``masks`` masks (exact noise); returns the runs."""
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.converge import mask_schedule, train_masks_converged

    cfg = MaskSearchConfig(steps=12, eval_every=4, patience=3, batch_size=16, lr=0.1)
    hps = [{"l0_weight": 0.5 + i % 3} for i in range(masks)]
    return train_masks_converged(
        model, train, val, cfg, hps, list(range(seed, seed + masks)), mask_schedule(cfg, 1),
        abl, "last", noise="exact",
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="model preset (tiny / small / base)")
    ap.add_argument("--pos", type=int, default=32, help="tokens per stimulus (n_ctx)")
    ap.add_argument("--problems", type=int, default=1000, help="evaluation problems")
    ap.add_argument("--masks", type=int, default=24, help="masks evaluated / trained at once")
    ap.add_argument("--budget-gb", type=float, default=2.0, help="gpu_memory_gb of check 1")
    ap.add_argument("--cap-mb", type=float, default=600.0, help="headroom of check 2's cap")
    ap.add_argument("--no-study", action="store_true", help="skip check 4 (a tiny study)")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA device: gpu_memory_check.py checks GPU memory and needs a GPU; "
              "nothing was run (the CPU tests are tests/test_memory.py)")  # fmt: skip
        return 0

    from subroutine_circuits import memory
    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.experiment.batched import fixed_mask_scores
    from subroutine_circuits.masks.ablator import Ablator, reference_ablator
    from subroutine_circuits.models import ModelSpec, make_model

    warnings = _Warnings()
    logging.getLogger("subroutine_circuits.memory").addHandler(warnings)
    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name(0)}, "
          f"{torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB; "
          f"torch {torch.__version__}; preset {args.preset}, pos {args.pos}")  # fmt: skip
    vocab = 64
    model = make_model(ModelSpec(preset=args.preset, n_ctx=args.pos), vocab, 0, dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = as_adapter(model, pool="last")
    um = tl_unit_map(model)
    data = _problems(args.problems, args.pos, vocab, 1, dev)
    train, val = _problems(256, args.pos, vocab, 2, dev), _problems(128, args.pos, vocab, 3, dev)
    abl = reference_ablator(adapter, um, _problems(128, args.pos, vocab, 4, dev).flat_inputs())
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(args.masks, um.n_units, generator=g) > 0.5
    per_row = memory.model_row_bytes(model, args.pos)
    per_row_grad = memory.model_row_bytes(model, args.pos, grad=True)
    print(f"estimated bytes per sequence: {per_row / 2**20:.2f} MiB (no grad), "
          f"{per_row_grad / 2**20:.2f} MiB (grad)")  # fmt: skip
    ok = True

    # reference: one worker, the default budget, no cap
    t0 = time.perf_counter()
    ref_scores = fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl)
    ref_acc = adapter.accuracy(data)
    ref_runs = _train(model, train, val, abl, args.masks)
    peak = torch.cuda.max_memory_allocated() / GIB
    print(f"reference (default budget {memory.budget_bytes(dev) / GIB:.1f} GiB): "
          f"{time.perf_counter() - t0:.1f} s, peak {peak:.2f} GiB")  # fmt: skip

    # 1. the budget sizes the chunks
    warnings.lines.clear()
    with memory.job_memory(dev, gpu_memory_gb=args.budget_gb) as rec:
        rows = memory.rows_per_pass(model, args.pos, 16384)
        scores = fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl)
        acc = adapter.accuracy(data)
        runs = _train(model, train, val, abl, args.masks)
    same = torch.allclose(scores, ref_scores, rtol=1e-4, atol=1e-5) and abs(acc - ref_acc) < 1e-9
    same_masks = all(torch.equal(a.mask.flat_binary(), b.mask.flat_binary())
                     for a, b in zip(runs, ref_runs))  # fmt: skip
    ok &= _report(
        "budget",
        same and rec["peak_gpu_memory_gb"] <= args.budget_gb,
        f"budget {rec['gpu_memory_budget_gb']:.2f} GiB -> {rows} sequences per evaluation pass; "
        f"peak {rec['peak_gpu_memory_gb']:.3f} GiB; scores equal: {same}; masks equal: "
        f"{same_masks} (float rounding may move a unit); back-offs: {len(warnings.lines)}",
    )

    # 2. forced out-of-memory under a hard cap: the back-off
    warnings.lines.clear()
    torch.cuda.reset_peak_memory_stats()
    cap = _cap(args.cap_mb)
    try:
        scores = fixed_mask_scores(
            model, data, keep, "last", unit_map=um, ablator=abl, max_rows=10**6
        )
        acc = adapter.accuracy(data, batch_size=10**6)
        n_eval = len(warnings.lines)
        memory._state["budget"] = 10**15  # the training asks for one pass of all K masks
        runs = _train(model, train, val, abl, args.masks)
    except torch.OutOfMemoryError as e:
        ok &= _report("forced OOM", False, f"not recovered: {e}")
    else:
        same = torch.allclose(scores, ref_scores, rtol=1e-4, atol=1e-5)
        same = same and abs(acc - ref_acc) < 1e-9
        n_masks = sum(
            torch.equal(a.mask.flat_binary(), b.mask.flat_binary()) for a, b in zip(runs, ref_runs)
        )
        for line in warnings.lines:
            print("   ", line)
        ok &= _report(
            "forced OOM",
            same and n_eval > 0 and len(warnings.lines) > n_eval,
            f"cap {cap:.2f} GiB; {n_eval} evaluation and {len(warnings.lines) - n_eval} "
            f"training back-offs; scores equal: {same}; masks equal: {n_masks}/{len(runs)}; "
            f"peak {torch.cuda.max_memory_allocated() / GIB:.3f} GiB",
        )
    finally:
        memory._state["budget"] = None
        memory._shrunk.clear()
        _uncap()

    # 3. a chunk of 1 that still does not fit: a clear error. A 2-layer model with 2**20 MLP
    # neurons: one problem (4 stimuli) needs >= 4 * pos * 2**20 * 4 bytes (512 MiB at pos 32)
    # for its MLP activations, far above a 64 MiB headroom.
    wide = make_model(ModelSpec(preset="tiny", n_ctx=args.pos, d_mlp=2**20), vocab, 0, dev)
    for p in wide.parameters():
        p.requires_grad_(False)
    wide_um = tl_unit_map(wide, kinds=["head"])
    few = _problems(4, args.pos, vocab, 5, dev)
    _cap(64)
    try:
        fixed_mask_scores(wide, few, torch.ones(2, wide_um.n_units, dtype=torch.bool), "last",
                          unit_map=wide_um, ablator=Ablator("zero"), max_rows=64)  # fmt: skip
    except memory.ChunkOutOfMemoryError as e:
        ok &= _report("chunk of 1", True, f"ChunkOutOfMemoryError: {str(e)[:200]}...")
    except Exception as e:  # noqa: BLE001 - reported, not raised
        ok &= _report("chunk of 1", False, f"{type(e).__name__}: {e}")
    else:
        ok &= _report("chunk of 1", False, "no error with a 64 MiB headroom")
    finally:
        memory._shrunk.clear()
        del wide
        _uncap()

    # 4. the manifest of a study on the GPU
    if not args.no_study:
        import json

        from subroutine_circuits.experiment import config_from_dict, run_experiment

        cfg = config_from_dict({
            "task": "agreement_singular", "inits": ["trained"], "base_seeds": [0],
            "mask_seeds": [0], "min_composite_acc": 0.0, "patching": False,
            "data": {"n_train": 60, "n_val": 20, "n_test": 20, "corpus_size": 100},
            "train": {"max_steps": 10, "eval_every": 10},
            "mask": {"steps": 6, "grid": [{"l0_weight": 1.0}], "prune": False},
            "n_random": 20, "gpu_memory_gb": args.budget_gb,
        })  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            run_experiment(cfg, Path(tmp) / "out", progress=False)
            manifest = json.loads((Path(tmp) / "out" / "manifest.json").read_text())
        peaks = manifest.get("peak_gpu_memory_gb", {})
        record = manifest["timings"]["base_models"][0]
        good = bool(peaks) and all(isinstance(v, float) and v > 0 for v in peaks.values())
        ok &= _report(
            "manifest",
            good and record.get("peak_gpu_memory_gb") is not None,
            f"peak_gpu_memory_gb {peaks}; per worker "
            f"{[w.get('peak_gpu_memory_gb') for w in manifest['executor']['per_worker'].values()]}",
        )

    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
