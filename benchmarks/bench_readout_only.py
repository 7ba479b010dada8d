"""Fixed-mask evaluation with the last block run at the readout position only, against every
position (the code before 2026-12-08).

The demo's model shape (tiny preset, 2 layers, 8 heads of width 8, d_mlp 128; random weights,
float64 like the demo's base models), 250 problems of 4 sentences of up to 11 tokens, K random
keep masks over heads and neurons under position-aware mean ablation (the demo's) and zero
ablation, on the CPU with one torch thread, alternated in one process; prints both times, their
ratio, the largest score difference and whether every problem's answer is the same.

    python benchmarks/bench_readout_only.py [--masks 32] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from subroutine_circuits.adapters import as_adapter, padded, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.experiment import batched
    from subroutine_circuits.masks.ablator import Ablator, reference_ablator
    from subroutine_circuits.models.cpu_kernels import fast_cpu_attention
    from subroutine_circuits.models.presets import hooked_transformer

    model = hooked_transformer(n_layers=2, d_model=64, n_heads=8, d_head=8, d_mlp=128,
                               d_vocab=60, n_ctx=32, act_fn="gelu", normalization_type="LN",
                               attention_dir="causal", seed=0, device="cpu")  # fmt: skip
    model = model.double().to(args.device)
    if not hasattr(model, "readout_residual"):
        raise SystemExit(f"{type(model).__name__} has no readout-only pass (TransformerLens 3.9?)")
    g = torch.Generator().manual_seed(0)
    data = EncodedProblems({"tokens": torch.randint(1, 60, (250, 4, 11), generator=g),
                            "lengths": torch.randint(6, 12, (250, 4), generator=g)},
                           torch.randint(0, 4, (250,), generator=g)).to(args.device)  # fmt: skip
    um = tl_unit_map(model)
    keep = torch.rand(args.masks, um.n_units, generator=g) < 0.3
    ablators = {
        "mean": reference_ablator(as_adapter(model, pool="last"), um, data.flat_inputs(), "mean"),
        "zero": Ablator("zero"),
    }
    readout_names = padded.readout_hook_names
    with fast_cpu_attention():
        for kind, abl in ablators.items():
            times: dict[str, list[float]] = {"every": [], "readout": []}
            out: dict[str, torch.Tensor] = {}
            for _ in range(args.repeats):
                for name, names in (("every", lambda *a: None), ("readout", readout_names)):
                    padded.readout_hook_names = names  # None: the pass over every position
                    try:
                        t0 = time.perf_counter()
                        out[name] = batched.fixed_mask_scores(model, data, keep, "last",
                                                              unit_map=um, ablator=abl)  # fmt: skip
                        times[name].append(time.perf_counter() - t0)
                    finally:
                        padded.readout_hook_names = readout_names
            best = {k: min(v) for k, v in times.items()}
            diff = float((out["every"] - out["readout"]).abs().max())
            same = torch.equal(out["every"].argmax(-1), out["readout"].argmax(-1))
            print(f"{args.device}, {kind} ablation, {args.masks} masks x 250 problems: every "
                  f"position {best['every']:.3f} s, readout only {best['readout']:.3f} s, ratio "
                  f"{best['every'] / best['readout']:.2f}x; largest score difference {diff:.1e}, "
                  f"same answers: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
