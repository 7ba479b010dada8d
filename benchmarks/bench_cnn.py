"""Benchmark: parameter counts and training-step time of the HookedCNN presets.

For every preset, times one OOO training step (forward of ``problems x 4`` images, 4-way
cross-entropy, backward, Adam step) and a SimCLR step (two augmented views, NT-Xent) on random
images at the preset's resolution, and prints the time per step, per image and the ratio to the
``cpu`` preset measured in the same process. Also times the forward pass of the ``cpu`` preset
under an all-ones unit mask (every channel hook) and an all-ones weight mask (every conv and
head weight), as ratios to the unmasked forward.

    python benchmarks/bench_cnn.py                       # cpu, cpu_wide; resnet50s with 1 problem
    python benchmarks/bench_cnn.py --presets cpu --reps 5
    python benchmarks/bench_cnn.py --device cuda --problems 32 --big-problems 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, reps: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up run."""
    fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def bench_preset(name: str, args: argparse.Namespace) -> dict:
    """Parameters and median OOO / SimCLR step times of one preset on random images."""
    from subroutine_circuits.models.cnn import HookedCNN, cnn_config
    from subroutine_circuits.models.simclr import augment_images, nt_xent

    dev = args.device
    cfg = cnn_config(name, device=dev)
    model = HookedCNN(cfg)
    big = cfg.block == "bottleneck"
    b = args.big_problems if big else args.problems
    s = cfg.image_size
    g = torch.Generator().manual_seed(0)
    problems = torch.randn(b, 4, 3, s, s, generator=g).to(dev)
    odd = torch.randint(0, 4, (b,), generator=g).to(dev)
    dots = (torch.rand(max(2, 2 * b), 3, s, s, generator=g) < 0.05).float()
    single = ((1.0 - dots * 0.7 - 0.9) / 0.1).to(dev)  # white canvas, dark dots, normalised
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def ooo_step():
        loss = F.cross_entropy(model.ooo_scores(problems), odd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def simclr_step():
        v1, v2 = augment_images(single, None, g), augment_images(single, None, g)
        z = model(torch.cat([v1, v2]))
        loss = nt_xent(z[: len(single)], z[len(single) :])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_ooo = _time(ooo_step, args.reps, dev)
    t_sim = _time(simclr_step, args.reps, dev)
    return dict(
        preset=name,
        params=model.n_params,
        px=s,
        images=4 * b,
        ooo_s=t_ooo,
        ooo_img_ms=1e3 * t_ooo / (4 * b),
        simclr_img_ms=1e3 * t_sim / (2 * len(single)),
    )


def main(argv: list[str] | None = None) -> None:
    from subroutine_circuits.masks import UnitMap, UnitMask, WeightMask
    from subroutine_circuits.models.cnn import (
        CNN_PRESETS,
        HookedCNN,
        cnn_config,
        cnn_unit_groups,
        cnn_weight_names,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(CNN_PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--problems", type=int, default=32, help="problems per step (cpu presets)")
    ap.add_argument("--big-problems", type=int, default=1, help="problems per step (resnet50s)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device
    print(f"device {dev}, {args.threads} CPU thread(s), torch {torch.__version__}")

    rows = [bench_preset(name, args) for name in args.presets]
    base = next((r for r in rows if r["preset"] == "cpu"), rows[0])
    print(
        f"{'preset':<14}{'params':>12}{'px':>5}{'imgs/step':>10}{'step s':>9}"
        f"{'ms/img':>9}{'x cpu':>8}{'SimCLR ms/img':>15}"
    )
    for r in rows:
        print(
            f"{r['preset']:<14}{r['params']:>12,}{r['px']:>5}{r['images']:>10}{r['ooo_s']:>9.3f}"
            f"{r['ooo_img_ms']:>9.2f}{r['ooo_img_ms'] / base['ooo_img_ms']:>8.1f}"
            f"{r['simclr_img_ms']:>15.2f}"
        )

    # mask overhead on the cpu preset (forward only, no grad)
    model = HookedCNN(cnn_config("cpu", device=dev))
    x = torch.randn(4 * args.problems, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = x.to(dev)
    um = UnitMap(cnn_unit_groups(model))
    umask = UnitMask.fixed(um, torch.ones(um.n_units, dtype=torch.bool))
    names = cnn_weight_names(model)
    n_w = WeightMask(model, None, names).n_total
    wmask = WeightMask.fixed(model, torch.ones(n_w, dtype=torch.bool), names)

    with torch.no_grad():
        t0 = _time(lambda: model(x), args.reps + 2, dev)
        with umask.applied(model):
            t_u = _time(lambda: model(x), args.reps + 2, dev)
        with wmask.applied(model):
            t_w = _time(lambda: model(x), args.reps + 2, dev)
    print(
        f"cpu preset forward of {x.shape[0]} images: {t0 * 1e3:.1f} ms; all-ones unit mask "
        f"({um.n_units} units) x{t_u / t0:.2f}; all-ones weight mask ({n_w:,} weights) "
        f"x{t_w / t0:.2f}"
    )


if __name__ == "__main__":
    main()
