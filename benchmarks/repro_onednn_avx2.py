"""Minimal reproducer of the oneDNN crash that killed CNN training on AVX2-only CPUs (issue 21).

What it shows: with oneDNN's AVX2 kernels (an AVX2-only CPU such as the AMD EPYC machines that
crashed, or any x86 CPU with ``ONEDNN_MAX_CPU_ISA=AVX2``), the *weight* gradient of a 1x1
convolution with stride 2 over a channels-last float32 input with fewer than 8 input channels
(oneDNN's AVX2 block of 8 floats) is computed by ``jit_1x1:avx2`` backward_weights, which writes
past its reduce-to-unit-stride workspace (upstream: uxlfoundation/oneDNN#6035, torch 2.13.0+cpu
ships oneDNN 3.12.0). On one thread the process dies (SIGSEGV, or SIGABRT from glibc's heap
checks: "free(): invalid next size"); on two it hangs or returns a wrong gradient. The input
gradient, the forward pass, NCHW inputs, stride 1, 3x3 kernels and 8+ input channels are fine.

In ``HookedCNN`` this is the 1x1 stride-2 shortcut conv of a stage whose input has few channels
(the tests' tiny CNNs: 4 -> 8 channels), fed channels-last because shape-world images are built
from ``[.., h, w, 3]`` arrays. ``models.cnn.SafeConv2d`` routes around it by computing such a
convolution as ``conv2d(x[:, :, ::2, ::2], W)`` with stride 1 (last rows of the table).

Each case runs in a child process (so a crash is reported, not suffered) and compares the
gradients with torch's own non-oneDNN kernels (``torch.backends.mkldnn.flags(enabled=False)``):

    python benchmarks/repro_onednn_avx2.py [--isa AVX2] [--threads 1] [--timeout 30]

Measured on this project's machine (AMD EPYC with AVX-512, torch 2.13.0+cpu), ``--isa AVX2``:
the three "crashes" rows die of SIGSEGV/SIGABRT (one thread) or hang / give a wrong gradient (two
threads); every other row is "ok". With ``--isa AVX512_CORE`` (or no limit) every row is "ok".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F

# name -> (batch, in channels, out channels, side, kernel, stride, channels_last, grads, how)
CASES: dict[str, tuple[int, int, int, int, int, int, bool, str, str]] = {
    "1x1 s2 cl ic4 (the CNN shortcut)": (32, 4, 8, 32, 1, 2, True, "both", "plain"),
    "1x1 s2 cl ic4, weight grad only": (32, 4, 8, 32, 1, 2, True, "weight", "plain"),
    "1x1 s2 cl ic3 (a 1x1 strided stem)": (32, 3, 8, 32, 1, 2, True, "weight", "plain"),
    "1x1 s2 cl ic4, input grad only": (32, 4, 8, 32, 1, 2, True, "input", "plain"),
    "1x1 s2 NCHW ic4": (32, 4, 8, 32, 1, 2, False, "both", "plain"),
    "1x1 s1 cl ic4": (32, 4, 8, 32, 1, 1, True, "both", "plain"),
    "1x1 s2 cl ic8": (32, 8, 8, 32, 1, 2, True, "both", "plain"),
    "3x3 s2 cl ic4": (32, 4, 8, 32, 3, 2, True, "both", "plain"),
    "1x1 s2 cl ic4, mkldnn disabled": (32, 4, 8, 32, 1, 2, True, "both", "no_mkldnn"),
    "1x1 s2 cl ic4, subsample + s1 (fix)": (32, 4, 8, 32, 1, 2, True, "both", "subsample"),
    "1x1 s2 cl ic4, models.cnn.SafeConv2d": (32, 4, 8, 32, 1, 2, True, "both", "safe"),
}
EXPECTED_CRASH = ("the CNN shortcut", "weight grad only", "strided stem")


def _conv(how: str, x: torch.Tensor, w: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    """The convolution of a case, computed the way ``how`` says."""
    if how == "subsample":
        return F.conv2d(x[:, :, ::stride, ::stride], w)
    if how == "safe":
        from subroutine_circuits.models.cnn import SafeConv2d

        conv = SafeConv2d(w.shape[1], w.shape[0], w.shape[2], stride, pad, bias=False)
        return torch.func.functional_call(conv, {"weight": w}, (x,))
    return F.conv2d(x, w, stride=stride, padding=pad)


def child(name: str) -> int:
    """Run one case in this process; print the gradients' largest relative error and return 0
    (matches torch's non-oneDNN result) or 3 (wrong)."""
    warnings.simplefilter("ignore")  # mkldnn.flags warns about TF32 on Intel GPUs
    n, cin, cout, side, k, s, cl, grads, how = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(n, cin, side, side)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(grads in ("both", "input"))
    w = torch.randn(cout, cin, k, k, requires_grad=grads in ("both", "weight"))
    wrt = [t for t in (x, w) if t.requires_grad]
    with torch.backends.mkldnn.flags(enabled=False):
        y_ref = F.conv2d(x, w, stride=s, padding=k // 2)
        g = torch.randn_like(y_ref)
        ref = torch.autograd.grad(y_ref, wrt, g)
    if how == "no_mkldnn":
        with torch.backends.mkldnn.flags(enabled=False):
            got = torch.autograd.grad(_conv("plain", x, w, s, k // 2), wrt, g)
    else:
        got = torch.autograd.grad(_conv(how, x, w, s, k // 2), wrt, g)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))
    print(f"{err:.1e}")
    return 0 if err < 1e-5 else 3


def main() -> None:
    """Run every case in a child process under the chosen oneDNN ISA and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA of the children")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        sys.exit(child(args.child))
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=args.isa)
    print(f"torch {torch.__version__}, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, ONEDNN_MAX_CPU_ISA={args.isa}, "
          f"{args.threads} thread(s)")  # fmt: skip
    for name in CASES:
        cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads)]
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            outcome = f"HUNG (killed after {args.timeout:.0f} s)"
        else:
            if r.returncode == 0:
                outcome = f"ok (max rel. error {r.stdout.strip()})"
            elif r.returncode == 3:
                outcome = f"WRONG gradient (max rel. error {r.stdout.strip()})"
            elif r.returncode < 0:
                outcome = f"CRASHED (signal {-r.returncode})"
            else:
                outcome = f"failed (exit {r.returncode}): {r.stderr.strip()[-200:]}"
        tag = "crashes on AVX2" if any(e in name for e in EXPECTED_CRASH) else ""
        print(f"  {name:<40} {tag:<16} {outcome}")


if __name__ == "__main__":
    main()
