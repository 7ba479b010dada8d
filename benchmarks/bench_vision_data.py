"""Benchmark: shape-world problem generation, window-count placement vs a pixel-gather baseline.

For every image task it generates composite problems twice in the same process: with the
library's placement counts (:func:`subroutine_circuits.tasks.vision.scenes.window_counts`: a
matrix of all windows, or an exact FFT correlation for large canvases) and with a baseline
that gathers every shape pixel at every offset (the first implementation). Both must produce
identical problems (same seed); it prints CPU seconds per 1,000 problems and the ratio.

    python benchmarks/bench_vision_data.py              # 200 problems per task at 32/40 px
    python benchmarks/bench_vision_data.py --size 128 --n 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from subroutine_circuits.tasks.vision import scenes as S  # noqa: E402
from subroutine_circuits.tasks.vision import vision_task  # noqa: E402


def gather_counts(canvas: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Baseline: index the canvas at every kernel pixel for every offset, then sum."""
    (bh, bw), (h, w) = canvas.shape, kernel.shape
    ny, nx = bh - h + 1, bw - w + 1
    pix = np.argwhere(kernel)
    py, px = pix[:, 0, None, None], pix[:, 1, None, None]
    oy, ox = np.arange(ny)[None, :, None], np.arange(nx)[None, None, :]
    return canvas[py + oy, px + ox].sum(0)


def run(name: str, n: int, size: int | None, counts) -> tuple[float, object]:
    S.window_counts = counts
    task = vision_task(name, image_size=size)
    t0 = time.process_time()
    probs = task.make_problems("composite", n, seed=0)
    return time.process_time() - t0, probs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="composite problems per task")
    p.add_argument("--size", type=int, default=None, help="image size (default: the task's)")
    args = p.parse_args()
    ours = S.window_counts
    print(f"{'task':16s} {'px':>4s} {'ours s/1k':>10s} {'gather s/1k':>12s} {'speed-up':>9s}")
    for name in ("inside_contact", "number_contact", "inside_number"):
        t_base, base = run(name, args.n, args.size, gather_counts)
        t_ours, mine = run(name, args.n, args.size, ours)
        assert np.array_equal(base.images, mine.images), "baseline and ours differ"
        px = mine.image_size
        k = 1000 / args.n
        print(f"{name:16s} {px:4d} {t_ours * k:10.2f} {t_base * k:12.2f} {t_base / t_ours:8.2f}x")
    S.window_counts = ours


if __name__ == "__main__":
    main()
