"""Benchmark: batched activation patching vs ``transformer_lens.patching``.

Patches the output (``hook_z``) of every attention head at every position, clean into
corrupted, on a random-weight model, with both our
:func:`subroutine_circuits.patching.activation.activation_patching` and TransformerLens'
``get_act_patch_attn_head_out_by_pos``; prints the time of each, the speed ratio and the
maximum absolute difference of the results.

    python benchmarks/bench_patching.py --device cuda        # 4 layers, d_model 512, 8 heads,
                                                              # batch 64 x 32 tokens
    python benchmarks/bench_patching.py --quick --device cpu  # small CPU smoke run
    python benchmarks/bench_patching.py --mid --device cpu --baseline  # CPU comparison

``--baseline`` also times our generic (pre-fast-path) implementation, ``activation_patching(...,
fast=False)``, in the same process, and prints the ratios against it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class BenchConfig:
    """Model and data sizes of one benchmark run (defaults: the full GPU benchmark)."""

    n_layers: int = 4
    d_model: int = 512
    n_heads: int = 8
    d_mlp: int = 2048
    d_vocab: int = 1000
    batch: int = 64
    pos: int = 32
    chunk_rows: int = 4096
    seed: int = 0


QUICK = BenchConfig(n_layers=2, d_model=64, n_heads=4, d_mlp=256, d_vocab=100, batch=8, pos=8)
#: A mid-size setting for CPU comparisons (the full benchmark's shape, smaller widths and batch).
MID = BenchConfig(n_layers=4, d_model=256, n_heads=8, d_mlp=1024, d_vocab=1000, batch=16, pos=32)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    """A readable name of the device (GPU model or CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_benchmark(
    cfg: BenchConfig, device: str = "cpu", repeats: int = 1, baseline: bool = False
) -> dict:
    """Time both implementations on the same model, data and metric; return the figures.

    With ``baseline`` also time our generic path (``fast=False``) and compare it too.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig, patching

    from subroutine_circuits.adapters import tl_unit_map
    from subroutine_circuits.patching.activation import activation_patching

    mcfg = HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
        d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.pos,
        act_fn="gelu",
        normalization_type="LN",
        seed=cfg.seed,
        device=device,
    )
    model = HookedTransformer(mcfg)
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    clean = torch.randint(0, cfg.d_vocab, (cfg.batch, cfg.pos), generator=g).to(device)
    corr = clean.clone()
    corr[:, cfg.pos // 2] = torch.randint(0, cfg.d_vocab, (cfg.batch,), generator=g).to(device)

    def metric(logits):  # per-example logit difference at the last position
        return logits[..., -1, 1] - logits[..., -1, 2]

    groups = tl_unit_map(model, kinds=("head",)).groups

    paths = []

    def ours(fast=True):
        res = activation_patching(
            model,
            clean,
            corr,
            metric,
            groups,
            per_position=True,
            chunk_rows=cfg.chunk_rows,
            fast=fast,
        )
        paths.append(res.extra.get("path"))
        return res.layer_grid("head")

    def theirs():
        with torch.no_grad():
            _, cache = model.run_with_cache(clean)
            with contextlib.redirect_stderr(io.StringIO()):  # silence tqdm
                return patching.get_act_patch_attn_head_out_by_pos(
                    model, corr, cache, lambda lg: metric(lg).mean()
                )

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best, out

    # warm-up (kernels, allocator) on both paths
    with torch.no_grad():
        model(clean)
    t_ours, r_ours = timed(ours)
    t_tl, r_tl = timed(theirs)
    diff = float((r_ours.cpu() - r_tl.cpu()).abs().max())
    scale = float(r_tl.abs().max())
    out = {
        "device": device_name(device),
        "shape": tuple(r_tl.shape),
        "n_patches": int(r_tl.numel()),
        "path": paths[0],
        "t_ours_s": t_ours,
        "t_transformer_lens_s": t_tl,
        "speedup": t_tl / t_ours,
        "max_abs_diff": diff,
        "max_abs_value": scale,
        "config": cfg,
    }
    if baseline:
        t_gen, r_gen = timed(lambda: ours(fast=False))
        out["t_generic_s"] = t_gen
        out["speedup_vs_generic"] = t_gen / t_ours
        out["speedup_generic_vs_tl"] = t_tl / t_gen
        out["max_abs_diff_generic"] = float((r_gen.cpu() - r_tl.cpu()).abs().max())
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: parse options, run, print a short table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument(
        "--mid", action="store_true", help="mid sizes (4 layers, d_model 256, batch 16 x 32)"
    )
    p.add_argument(
        "--baseline", action="store_true", help="also time our generic path (fast=False)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats (best is reported)")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per forward (ours)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick and args.mid:
        raise SystemExit("error: choose one of --quick and --mid")
    cfg = QUICK if args.quick else MID if args.mid else BenchConfig()
    if args.chunk_rows is not None:
        cfg.chunk_rows = args.chunk_rows
    r = run_benchmark(cfg, args.device, args.repeats, args.baseline)
    print(f"device:                 {r['device']}")
    print(
        f"model:                  {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads, d_mlp {cfg.d_mlp}; batch {cfg.batch} x {cfg.pos} tokens"
    )
    print(f"patches (layer,pos,head): {r['n_patches']} -> result shape {r['shape']}")
    print(f"ours ({r['path']}):      {r['t_ours_s']:.3f} s")
    print(f"transformer_lens:       {r['t_transformer_lens_s']:.3f} s")
    print(f"speed ratio (TL/ours):  {r['speedup']:.1f}x")
    print(f"max abs difference:     {r['max_abs_diff']:.2e} (max |value| {r['max_abs_value']:.2e})")
    if args.baseline:
        print(f"ours generic (fast=False): {r['t_generic_s']:.3f} s")
        print(f"speed ratio (generic/ours): {r['speedup_vs_generic']:.1f}x")
        print(f"speed ratio (TL/generic):   {r['speedup_generic_vs_tl']:.1f}x")
        print(f"max abs difference generic: {r['max_abs_diff_generic']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
