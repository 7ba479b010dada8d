"""Fixed-mask evaluation: boolean masks and one mean replacement per problem chunk, against the
float 0/1 formula with the replacement rebuilt in every pass (the code before 2026-12-07).

The demo's model shape (tiny preset, 8 heads of width 8, d_mlp 128; random weights), 250
problems of 4 sentences of 11 tokens, K random keep masks over heads and neurons under
position-aware mean ablation (the demo's) and zero ablation, on the CPU with one torch thread,
alternated in one process; prints both times, their ratio and whether the scores are identical.

    python benchmarks/bench_fixed_eval.py [--masks 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.experiment import batched
    from subroutine_circuits.masks.ablator import Ablator, reference_ablator
    from subroutine_circuits.models.cpu_kernels import fast_cpu_attention
    from subroutine_circuits.models.presets import hooked_transformer

    class FloatRun(batched._FixedRun):
        """The earlier hook: float 0/1 masks, the replacement rebuilt in every pass."""

        def hook(self, gi, x):
            g = self.unit_map.groups[gi]
            keep = self.keep[:, self.slices[gi]].float()
            return batched._mix_or_record(x, g, lambda: keep, self.recording, self.ablator,
                                          self.state, self.abl)  # fmt: skip

        def scores(self, tok, lens, k0, k1):
            self.state = None
            return super().scores(tok, lens, k0, k1)

    model = hooked_transformer(n_layers=2, d_model=64, n_heads=8, d_head=8, d_mlp=128,
                               d_vocab=60, n_ctx=32, act_fn="gelu", normalization_type="LN",
                               attention_dir="causal", seed=0, device="cpu")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = EncodedProblems({"tokens": torch.randint(1, 60, (250, 4, 11), generator=g),
                            "lengths": torch.randint(6, 12, (250, 4), generator=g)},
                           torch.randint(0, 4, (250,), generator=g))  # fmt: skip
    um = tl_unit_map(model)
    keep = torch.rand(args.masks, um.n_units, generator=g) < 0.3
    ablators = {
        "mean": reference_ablator(as_adapter(model, pool="last"), um, data.flat_inputs(), "mean"),
        "zero": Ablator("zero"),
    }
    new_run = batched._FixedRun
    with fast_cpu_attention():
        for kind, abl in ablators.items():
            times: dict[str, list[float]] = {"float": [], "bool": []}
            out: dict[str, torch.Tensor] = {}
            for _ in range(args.repeats):
                for name, cls in (("float", FloatRun), ("bool", new_run)):
                    batched._FixedRun = cls
                    try:
                        t0 = time.perf_counter()
                        out[name] = batched.fixed_mask_scores(model, data, keep, "last",
                                                              unit_map=um, ablator=abl)  # fmt: skip
                        times[name].append(time.perf_counter() - t0)
                    finally:
                        batched._FixedRun = new_run
            best = {k: min(v) for k, v in times.items()}
            print(f"{kind} ablation, {args.masks} masks x 250 problems: float {best['float']:.3f}"
                  f" s, bool {best['bool']:.3f} s, ratio {best['float'] / best['bool']:.2f}x; "
                  f"identical scores: {torch.equal(out['float'], out['bool'])}")  # fmt: skip


if __name__ == "__main__":
    main()
