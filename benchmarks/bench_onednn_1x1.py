"""Cost of routing around the oneDNN strided-1x1 bug (``models.cnn.SafeConv2d``, issue 21).

Times one CNN training step (OOO forward, cross-entropy, backward, Adam step, as
``models.cnn_train._train_step``) in three ways, in the same process, alternating them round by
round in a rotating order (median over rounds):

* ``plain``: ``SafeConv2d.reroute = False``, every conv on oneDNN as torch chooses (what crashes
  with oneDNN's AVX2 kernels; run it only on a CPU whose oneDNN uses AVX-512),
* ``rerouted``: the library default (strided 1x1 convs with < 16 input channels computed as
  subsample + unit-stride 1x1),
* ``no-mkldnn``: ``plain`` inside ``torch.backends.mkldnn.flags(enabled=False)`` around the whole
  step (the other way around the bug, for comparison).

Models: the tests' tiny CNN (a 4 -> 8 channel 1x1 stride-2 shortcut: rerouted) and the ``cpu``
preset (no convolution matches, so ``rerouted`` runs exactly ``plain``'s kernels: its ratio
shows the timing noise). First, the rerouted layer alone. Images are
channels-last, as shape-world images reach the network.

    python benchmarks/bench_onednn_1x1.py [--threads 1] [--rounds 30] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from subroutine_circuits.models.cnn import HookedCNN, SafeConv2d, cnn_config
from subroutine_circuits.models.cnn_train import make_toy_ooo

TINY_CNN = {
    "stem_channels": 4,
    "stage_widths": [4, 8],
    "stage_channels": [4, 8],
    "stage_blocks": [1, 1],
    "stage_strides": [1, 2],
    "d_hidden": 8,
    "d_embed": 8,
}  # fmt: skip (tests/experiment/test_vision_experiment.py)


def _steps(model: HookedCNN, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           n: int) -> float:  # fmt: skip
    """Seconds per training step, over ``n`` steps."""
    t0 = time.perf_counter()
    for _ in range(n):
        loss = F.cross_entropy(model.ooo_scores(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def bench(name: str, overrides: dict, batch: int, rounds: int, steps: int) -> None:
    """Print the median step time of each mode and the ratios for one model."""
    model = HookedCNN(cnn_config("cpu", image_size=32, **overrides)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, odd = make_toy_ooo(batch, image_size=32, seed=0)
    # channels-last, as shape-world images ([.., h, w, 3] arrays) reach the network
    x = images.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    n_rerouted = sum(
        isinstance(m, SafeConv2d) and m.rerouted(x) for m in model.modules()
    )  # fmt: skip
    modes = {
        "plain": (False, contextlib.nullcontext),
        "rerouted": (True, contextlib.nullcontext),
        "no-mkldnn": (False, lambda: torch.backends.mkldnn.flags(enabled=False)),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for reroute, ctx in modes.values():  # warm-up
        SafeConv2d.reroute = reroute
        with ctx():
            _steps(model, opt, x, odd, 2)
    names = list(modes)
    for r in range(rounds):
        for mode in names[r % 3 :] + names[: r % 3]:  # rotate the order: no position bias
            reroute, ctx = modes[mode]
            SafeConv2d.reroute = reroute
            with ctx():
                times[mode].append(_steps(model, opt, x, odd, steps))
    SafeConv2d.reroute = True
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"{name}: {model.n_params} params, {batch} problems ({4 * batch} images) per step, "
          f"{n_rerouted} conv(s) rerouted")  # fmt: skip
    for m in modes:
        print(f"  {m:<10} {med[m] * 1e3:8.2f} ms/step   ratio to plain {med[m] / med['plain']:.3f}")


def bench_layer(rounds: int, steps: int) -> None:
    """The rerouted layer alone: the tiny CNN's 4 -> 8 shortcut conv, forward + backward."""
    conv = SafeConv2d(4, 8, 1, 2, bias=False)
    x = torch.randn(128, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def go() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            conv(x).square().sum().backward()
        return (time.perf_counter() - t0) / steps

    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for reroute in (r % 2 == 0, r % 2 == 1):
            SafeConv2d.reroute = reroute
            times[reroute].append(go())
    SafeConv2d.reroute = True
    plain, rer = statistics.median(times[False]), statistics.median(times[True])
    print("the 4 -> 8 1x1 stride-2 conv alone, [128, 4, 32, 32] channels-last, fwd+bwd: "
          f"plain {plain * 1e3:.3f} ms, rerouted {rer * 1e3:.3f} ms, "
          f"ratio {rer / plain:.3f}")  # fmt: skip


def main() -> None:
    """Run the benchmark on the tiny and the ``cpu`` CNN and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5, help="training steps per timing")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # mkldnn.flags warns about TF32 on Intel GPUs
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith(("AVX2", "AVX_", "SSE")):
        raise SystemExit("the 'plain' mode crashes with oneDNN's AVX2 kernels: unset "
                         "ONEDNN_MAX_CPU_ISA and run on a CPU with AVX-512")  # fmt: skip
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s)")  # fmt: skip
    bench_layer(args.rounds, 4 * args.steps)
    bench("tiny test CNN", TINY_CNN, 8, args.rounds, args.steps)
    bench("tiny test CNN", TINY_CNN, 32, args.rounds, args.steps)
    bench("cpu preset", {}, 32, max(1, args.rounds // 3), args.steps)


if __name__ == "__main__":
    main()
