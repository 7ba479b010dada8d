"""Attention softmax on the CPU: torch.softmax vs models.cpu_kernels.softmax_lastdim.

Prints forward and forward+backward times of both on attention-shaped scores and their ratio
(same process, one torch thread by default), plus a demo-sized mask-evaluation pass of a tiny
transformer with and without ``fast_cpu_attention``.

    python benchmarks/bench_cpu_softmax.py [--threads 1] [--reps 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from subroutine_circuits.models.cpu_kernels import fast_cpu_attention, softmax_lastdim


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    """Run the benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = (256, 8, 12, 12)
    x = torch.randn(shape).masked_fill(torch.rand(shape) < 0.3, float("-inf"))
    g = torch.randn(shape)

    def fb(f):
        def go():
            xx = x.clone().requires_grad_()
            f(xx).backward(g)

        return go

    rows = [
        ("forward", _time(lambda: torch.softmax(x, -1), args.reps),
         _time(lambda: softmax_lastdim(x), args.reps)),
        ("forward+backward", _time(fb(lambda t: torch.softmax(t, -1)), args.reps),
         _time(fb(softmax_lastdim), args.reps)),
    ]  # fmt: skip
    from subroutine_circuits.models import ModelSpec, make_model

    model = make_model(ModelSpec("tiny", n_heads=8, d_head=8, d_mlp=128), 60, seed=0)
    tok = torch.randint(1, 60, (1024, 12))

    def fwd():
        with torch.no_grad():
            model(tok)

    def fwd_fast():
        with fast_cpu_attention():
            fwd()

    rows.append(("tiny transformer forward, 1024 x 12", _time(fwd, 5), _time(fwd_fast, 5)))
    print(f"threads={args.threads}  scores {list(shape)}")
    print(f"{'what':<38}{'torch ms':>10}{'lastdim ms':>12}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:<38}{a * 1e3:>10.2f}{b * 1e3:>12.2f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
