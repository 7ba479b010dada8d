"""Benchmark: mask-training throughput, K masks batched in one forward pass vs one at a time.

For each model shape, trains K unit masks (hard concrete by default, seeds 0..K-1, a spread of
``l0_weight``) on random odd-one-out problems over a frozen random-weight TransformerLens model:

- *separate*: ``experiment.search.train_mask`` called K times (today's path);
- *batched*: ``experiment.converge.train_masks_converged`` with the same K runs in one loop
  (whole budget: no early stop, one evaluation at the end; unit masks).

Both run in the same process after a warm-up; the table shows mask-steps per second
(K * steps / seconds) and the ratio batched / separate. With ``--noise exact`` (the default on
CPU) the batched masks equal the separate ones, and the largest logit difference is printed.
``--eval`` also times K fixed masks evaluated in one pass (``evaluate_fixed_masks``) against
K calls of ``experiment.search.accuracy``.

Shapes: ``tiny`` (the library's tiny preset: 2 layers, d_model 64, 4 heads, d_mlp 256) and
``gpt2`` (GPT-2 small: 12 layers, d_model 768, 12 heads, d_mlp 3072, n_ctx 32; d_vocab 1000 since
the OOO readout never uses the unembedding).

    python benchmarks/bench_masks.py --device cpu --k 4 --steps 10          # CPU smoke run
    python benchmarks/bench_masks.py --device cuda --k 16 --steps 100 --eval
    python benchmarks/bench_masks.py --device cuda --shapes gpt2 --k 8 --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": {"preset": "tiny", "overrides": {}, "pos": 12},
    "gpt2": {
        "preset": "base",
        "overrides": {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_head": 64, "d_mlp": 3072},
        "pos": 32,
    },
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    """A readable name of the device (GPU model or CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.get_num_threads()} threads)"


def build(shape: str, device: str, n_problems: int, seed: int = 0):
    """A random-weight model of ``shape`` and random encoded OOO problems on ``device``."""
    from subroutine_circuits.experiment.search import EncodedProblems
    from subroutine_circuits.models.presets import ModelSpec, make_model

    s = SHAPES[shape]
    pos = s["pos"]
    spec = ModelSpec(s["preset"], n_ctx=pos, overrides=dict(s["overrides"]))
    vocab = 1000
    model = make_model(spec, vocab_size=vocab, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, vocab, (n_problems, 4, pos), generator=g)
    lens = torch.randint(pos // 2, pos + 1, (n_problems, 4), generator=g)
    toks = toks * (torch.arange(pos)[None, None, :] < lens[..., None])
    odd = torch.randint(0, 4, (n_problems,), generator=g)
    return model, EncodedProblems({"tokens": toks, "lengths": lens}, odd).to(device)


def _logits(mask) -> torch.Tensor:
    return torch.cat(
        [
            (p.log_alpha if hasattr(p, "log_alpha") else p.logits).detach().flatten()
            for p in mask.parts
        ]
    ).cpu()


def bench_shape(shape: str, args) -> dict:
    """Time separate vs batched mask training (and optionally fixed-mask evaluation)."""
    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.experiment.batched import evaluate_fixed_masks, matched_random_masks
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.converge import mask_schedule, train_masks_converged
    from subroutine_circuits.experiment.search import accuracy, train_mask
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    model, data = build(shape, args.device, n_problems=max(64, 4 * args.batch))
    k, steps = args.k, args.steps
    hps = [{"l0_weight": 0.5 + 0.25 * i} for i in range(k)]
    seeds = list(range(k))
    amp = torch.bfloat16 if args.bf16 else None

    def autocast():
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(args.device).type, dtype=amp)

    def run_separate(n_steps):
        cfg = MaskSearchConfig(
            kind=args.kind,
            parametrization=args.parametrization,
            steps=n_steps,
            batch_size=args.batch,
        )
        with autocast():
            return [train_mask(model, data, cfg, hp, s, pool="last") for hp, s in zip(hps, seeds)]

    def run_batched(n_steps):
        cfg = MaskSearchConfig(
            kind=args.kind,
            parametrization=args.parametrization,
            steps=n_steps,
            batch_size=args.batch,
        )
        sched = mask_schedule(
            MaskSearchConfig(steps=n_steps, eval_every=n_steps, patience=0,
                             batch_size=args.batch), len(data),
        )  # fmt: skip
        sync_debug = args.sync_debug and args.device.startswith("cuda")
        if sync_debug:  # report any host sync inside the batched loop
            torch.cuda.set_sync_debug_mode("warn")
        try:
            runs = train_masks_converged(
                model, data, data, cfg, hps, seeds, sched, Ablator("zero"), "last",
                noise=args.noise, autocast_dtype=amp,
            )  # fmt: skip
            return [r.mask for r in runs]
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode(0)

    run_separate(2)  # warm-up (kernels, allocator, cuBLAS handles)
    run_batched(2)
    times = {"separate": [], "batched": []}
    sep = bat = None
    for _ in range(args.reps):
        _sync(args.device)
        t0 = time.perf_counter()
        sep = run_separate(steps)
        _sync(args.device)
        t1 = time.perf_counter()
        bat = run_batched(steps)
        _sync(args.device)
        t2 = time.perf_counter()
        times["separate"].append(t1 - t0)
        times["batched"].append(t2 - t1)
    t_sep, t_bat = min(times["separate"]), min(times["batched"])
    row = {
        "shape": shape,
        "k": k,
        "steps": steps,
        "seqs_per_fwd": 4 * args.batch * k,
        "sep_s": t_sep,
        "bat_s": t_bat,
        "sep_rate": k * steps / t_sep,
        "bat_rate": k * steps / t_bat,
        "ratio": t_sep / t_bat,
        "max_dlogit": max(float((_logits(a) - _logits(b)).abs().max()) for a, b in zip(sep, bat)),
        "same_binary": sum(
            bool((a.flat_binary() == b.flat_binary()).all()) for a, b in zip(sep, bat)
        ),
    }
    if args.eval and args.kind == "unit":
        um = tl_unit_map(model)
        draws = matched_random_masks(um, sep[0].flat_binary(), args.eval_k, seed=0)
        fixed = [UnitMask.fixed(um, ~d) for d in draws]
        evaluate_fixed_masks(model, data, fixed[:2], "last")  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        with autocast():
            one = [accuracy(as_adapter(model, pool="last"), data, m) for m in fixed]
        _sync(args.device)
        t1 = time.perf_counter()
        with autocast():
            many = evaluate_fixed_masks(model, data, fixed, "last")
        _sync(args.device)
        t2 = time.perf_counter()
        row.update(
            eval_k=args.eval_k,
            eval_sep_s=t1 - t0,
            eval_bat_s=t2 - t1,
            eval_ratio=(t1 - t0) / (t2 - t1),
            eval_max_dacc=float((many - torch.tensor(one)).abs().max()),
        )
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--k", type=int, default=8, help="masks trained together")
    p.add_argument("--steps", type=int, default=50, help="training steps per mask")
    p.add_argument("--batch", type=int, default=16, help="OOO problems per mask and step")
    p.add_argument("--shapes", default="tiny,gpt2", help="comma list of: " + ",".join(SHAPES))
    p.add_argument("--parametrization", default="hard_concrete")
    p.add_argument("--kind", default="unit", choices=["unit"], help="mask kind (unit masks)")
    p.add_argument(
        "--sync-debug",
        action="store_true",
        help="CUDA: warn on every host sync inside the batched run (expect one per chunk)",
    )
    p.add_argument("--noise", default="auto", choices=["auto", "exact", "device"])
    p.add_argument("--bf16", action="store_true", help="run the frozen model under bf16 autocast")
    p.add_argument("--reps", type=int, default=1, help="timed repetitions (the best is kept)")
    p.add_argument("--eval", action="store_true", help="also time fixed-mask evaluation")
    p.add_argument("--eval-k", type=int, default=24, help="fixed masks for --eval")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    print(
        f"device: {device_name(args.device)} | torch {torch.__version__} | "
        f"{args.kind} masks | {args.parametrization} | noise {args.noise} | bf16 {args.bf16}"
    )
    head = (
        f"{'shape':6} {'K':>3} {'steps':>5} {'seq/fwd':>7} {'sep s':>8} {'batch s':>8} "
        f"{'sep mask-steps/s':>16} {'batched mask-steps/s':>20} {'ratio':>6} "
        f"{'max|dlogit|':>11} {'same bin':>8}"
    )
    print(head)
    rows = []
    for s in shapes:
        r = bench_shape(s, args)
        rows.append(r)
        print(
            f"{r['shape']:6} {r['k']:>3} {r['steps']:>5} {r['seqs_per_fwd']:>7} "
            f"{r['sep_s']:>8.2f} {r['bat_s']:>8.2f} {r['sep_rate']:>16.1f} "
            f"{r['bat_rate']:>20.1f} {r['ratio']:>5.2f}x {r['max_dlogit']:>11.2e} "
            f"{r['same_binary']:>4}/{r['k']}",
            flush=True,
        )
    if args.eval and args.kind == "unit":
        print(f"\nfixed-mask evaluation ({rows[0]['eval_k']} masks, 64+ problems):")
        print(f"{'shape':6} {'one-by-one s':>12} {'batched s':>10} {'ratio':>7} {'max|dacc|':>9}")
        for r in rows:
            print(
                f"{r['shape']:6} {r['eval_sep_s']:>12.3f} {r['eval_bat_s']:>10.3f} "
                f"{r['eval_ratio']:>6.2f}x {r['eval_max_dacc']:>9.4f}"
            )


if __name__ == "__main__":
    main()
