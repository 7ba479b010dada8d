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

``--variant A,B`` and ``--chunk-rows N,M`` time each fast-path variant (see
``subroutine_circuits.patching.fast_forward.FAST_VARIANTS``) at each chunk size in the same
process too, and print each one's time, its ratio vs TransformerLens and vs our previous fast
path (``positions`` at 4096 rows, always timed with a sweep) and its maximum difference to TL;
``--sweep`` is every variant at 4096 and 16384 rows:

    python benchmarks/bench_patching.py --device cuda --repeats 3 --baseline --sweep
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


#: The fast path before the packed variant (the reference of a sweep): variant, chunk_rows.
PREVIOUS = ("positions", 4096)


def _setup(cfg: BenchConfig, device: str):
    """The random-weight model and the clean/corrupted tokens (corrupted at ``pos // 2``)."""
    from subroutine_circuits.models.presets import hooked_transformer

    model = hooked_transformer(
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
    g = torch.Generator().manual_seed(cfg.seed)
    clean = torch.randint(0, cfg.d_vocab, (cfg.batch, cfg.pos), generator=g).to(device)
    corr = clean.clone()
    corr[:, cfg.pos // 2] = torch.randint(0, cfg.d_vocab, (cfg.batch,), generator=g).to(device)
    return model, clean, corr


def run_benchmark(
    cfg: BenchConfig,
    device: str = "cpu",
    repeats: int = 1,
    baseline: bool = False,
    sweep: list[tuple[str, int]] | None = None,
) -> dict:
    """Time both implementations on the same model, data and metric; return the figures.

    With ``baseline`` also time our generic path (``fast=False``) and compare it too. With
    ``sweep`` (``[(variant, chunk_rows), ...]``) also time those fast-path variants and
    :data:`PREVIOUS`; their figures are in ``out["sweep"]`` (one dict per entry).
    """
    from transformer_lens import patching

    from subroutine_circuits.adapters import tl_unit_map
    from subroutine_circuits.patching.activation import activation_patching

    model, clean, corr = _setup(cfg, device)

    def metric(logits):  # per-example logit difference at the last position
        return logits[..., -1, 1] - logits[..., -1, 2]

    groups = tl_unit_map(model, kinds=("head",)).groups

    paths, variants = [], []

    def ours(fast=True, chunk_rows=cfg.chunk_rows):
        res = activation_patching(
            model,
            clean,
            corr,
            metric,
            groups,
            per_position=True,
            chunk_rows=chunk_rows,
            fast=fast,
        )
        paths.append(res.extra.get("path"))
        variants.append(res.extra.get("variant", "generic"))
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
        "variant": variants[0],
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
    if sweep:
        out["sweep"] = _sweep(sweep, ours, timed, r_tl, t_tl)
    return out


def _sweep(entries: list[tuple[str, int]], ours, timed, r_tl, t_tl) -> list[dict]:
    """Time each ``(variant, chunk_rows)`` (after one untimed warm-up run) and
    :data:`PREVIOUS`; ratios vs TransformerLens and vs :data:`PREVIOUS`."""
    rows = []
    for variant, chunk_rows in [PREVIOUS] + [e for e in entries if e != PREVIOUS]:
        ours(variant, chunk_rows)  # warm-up: kernels, allocator
        t, r = timed(lambda v=variant, c=chunk_rows: ours(v, c))
        rows.append(
            {
                "variant": variant,
                "chunk_rows": chunk_rows,
                "t_s": t,
                "speedup_vs_tl": t_tl / t,
                "max_abs_diff": float((r.cpu() - r_tl.cpu()).abs().max()),
            }
        )
    for row in rows:
        row["speedup_vs_previous"] = rows[0]["t_s"] / row["t_s"]
    return rows


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
    p.add_argument(
        "--chunk-rows", default=None, help="rows per forward (ours); a comma list with --variant"
    )
    p.add_argument("--variant", default=None, help="fast-path variants to time, comma-separated")
    p.add_argument(
        "--sweep", action="store_true", help="every variant at 4096 and 16384 rows per forward"
    )
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick and args.mid:
        raise SystemExit("error: choose one of --quick and --mid")
    cfg = QUICK if args.quick else MID if args.mid else BenchConfig()
    sweep = _sweep_entries(args)
    if args.chunk_rows is not None and not sweep:
        cfg.chunk_rows = _int_list(args.chunk_rows)[0]
    r = run_benchmark(cfg, args.device, args.repeats, args.baseline, sweep)
    print(f"device:                 {r['device']}")
    print(
        f"model:                  {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads, d_mlp {cfg.d_mlp}; batch {cfg.batch} x {cfg.pos} tokens"
    )
    print(f"patches (layer,pos,head): {r['n_patches']} -> result shape {r['shape']}")
    print(f"ours ({r['path']}, {r['variant']}): {r['t_ours_s']:.3f} s")
    print(f"transformer_lens:       {r['t_transformer_lens_s']:.3f} s")
    print(f"speed ratio (TL/ours):  {r['speedup']:.1f}x")
    print(f"max abs difference:     {r['max_abs_diff']:.2e} (max |value| {r['max_abs_value']:.2e})")
    if args.baseline:
        print(f"ours generic (fast=False): {r['t_generic_s']:.3f} s")
        print(f"speed ratio (generic/ours): {r['speedup_vs_generic']:.1f}x")
        print(f"speed ratio (TL/generic):   {r['speedup_generic_vs_tl']:.1f}x")
        print(f"max abs difference generic: {r['max_abs_diff_generic']:.2e}")
    if sweep:
        _print_sweep(r["sweep"])
    return 0


def _int_list(text: str) -> list[int]:
    """``"4096,16384"`` -> ``[4096, 16384]`` (each >= 1)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --chunk-rows takes integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"error: --chunk-rows values must be >= 1, got {text!r}")
    return values


def _sweep_entries(args) -> list[tuple[str, int]]:
    """The ``(variant, chunk_rows)`` pairs asked for by ``--variant``/``--sweep``."""
    from subroutine_circuits.patching.fast_forward import FAST_VARIANTS

    if args.sweep:
        variants = list(FAST_VARIANTS)
        sizes = _int_list(args.chunk_rows) if args.chunk_rows else [4096, 16384]
    elif args.variant:
        variants = [v.strip() for v in args.variant.split(",") if v.strip()]
        sizes = _int_list(args.chunk_rows) if args.chunk_rows else [BenchConfig.chunk_rows]
    else:
        return []
    unknown = [v for v in variants if v not in FAST_VARIANTS and v != "auto"]
    if unknown:
        raise SystemExit(f"error: unknown --variant {unknown}; known: {list(FAST_VARIANTS)}")
    return [(v, c) for v in variants for c in sizes]


def _print_sweep(rows: list[dict]) -> None:
    """One line per timed variant (the first is the previous fast path, the reference)."""
    prev = f"{PREVIOUS[0]}@{PREVIOUS[1]}"
    print(f"\nfast-path variants (ratios vs TL and vs the previous fast path {prev}):")
    print(f"{'variant':<16}{'chunk_rows':>11}{'time (s)':>10}{'TL/x':>8}{'prev/x':>8}{'diff':>10}")
    for row in rows:
        print(
            f"{row['variant']:<16}{row['chunk_rows']:>11}{row['t_s']:>10.3f}"
            f"{row['speedup_vs_tl']:>7.1f}x{row['speedup_vs_previous']:>7.2f}x"
            f"{row['max_abs_diff']:>10.1e}"
        )


if __name__ == "__main__":
    sys.exit(main())
