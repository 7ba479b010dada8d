"""Fixed-mask evaluation with and without the layer-0 prefix memo (models.native.PrefixMemo).

The demo's model shape (tiny preset, 8 heads of width 8, d_mlp 128; random weights), 250
problems of 4 sentences of 11 tokens, K random keep masks over heads and neurons under
position-aware mean ablation, on the CPU with one torch thread, alternated in one process;
prints both times, their ratio and whether the scores are identical.

    python benchmarks/bench_prefix_memo.py [--masks 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.experiment.batched import fixed_mask_scores
    from subroutine_circuits.masks.ablator import reference_ablator
    from subroutine_circuits.models.cpu_kernels import fast_cpu_attention
    from subroutine_circuits.models.presets import hooked_transformer

    model = hooked_transformer(n_layers=2, d_model=64, n_heads=8, d_head=8, d_mlp=128,
                               d_vocab=60, n_ctx=32, act_fn="gelu", normalization_type="LN",
                               attention_dir="causal", seed=0, device="cpu")  # fmt: skip
    if not callable(getattr(model, "prefix_memo", None)):
        raise SystemExit("needs TransformerLens 4.x (NativeTransformer): 3.x has no prefix memo")
    g = torch.Generator().manual_seed(0)
    data = EncodedProblems({"tokens": torch.randint(1, 60, (250, 4, 11), generator=g),
                            "lengths": torch.full((250, 4), 11)},
                           torch.randint(0, 4, (250,), generator=g))  # fmt: skip
    um = tl_unit_map(model)
    keep = torch.rand(args.masks, um.n_units, generator=g) < 0.7
    abl = reference_ablator(as_adapter(model, pool="last"), um, data.flat_inputs(), "mean")
    method = type(model).prefix_memo
    times: dict[str, list[float]] = {"memo": [], "plain": []}
    out: dict[str, torch.Tensor] = {}
    with fast_cpu_attention():
        for _ in range(args.repeats):
            for name in ("plain", "memo"):
                if name == "plain":
                    model.prefix_memo = None  # hides the method
                else:
                    del model.prefix_memo
                t0 = time.perf_counter()
                out[name] = fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl)
                times[name].append(time.perf_counter() - t0)
    assert type(model).prefix_memo is method
    best = {k: min(v) for k, v in times.items()}
    print(f"{args.masks} masks x 250 problems: plain {best['plain']:.3f} s, memo "
          f"{best['memo']:.3f} s, ratio {best['plain'] / best['memo']:.2f}x; identical scores: "
          f"{torch.equal(out['plain'], out['memo'])}")  # fmt: skip


if __name__ == "__main__":
    main()
