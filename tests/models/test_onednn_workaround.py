"""The CNN's way around oneDNN's strided-1x1 weight-gradient bug (issue 21, ``SafeConv2d``).

With oneDNN's AVX2 kernels (AVX2-only CPUs; ``ONEDNN_MAX_CPU_ISA=AVX2`` elsewhere) the weight
gradient of a 1x1 stride-2 conv over a channels-last input with < 8 input channels killed the
process (``benchmarks/repro_onednn_avx2.py``). These tests train through exactly that layer
(the tiny CNNs' 4 -> 8 shortcut, and a 1x1 strided stem) on channels-last images; they belong
to the CPU-sensitive set that CI runs under ``ONEDNN_MAX_CPU_ISA=AVX2``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from subroutine_circuits.models.cnn import (
    CNN_PRESETS,
    STRIDED_1X1_MAX_IN_CHANNELS,
    HookedCNN,
    SafeConv2d,
    cnn_config,
)
from subroutine_circuits.models.cnn_train import CNNTrainConfig, make_toy_ooo, train_cnn_ooo

# as tests/experiment/test_vision_experiment.py: stage 1's shortcut is a 4 -> 8, 1x1 stride-2 conv
TINY_CNN = {
    "stem_channels": 4, "stage_widths": [4, 8], "stage_channels": [4, 8],
    "stage_blocks": [1, 1], "stage_strides": [1, 2], "d_hidden": 8, "d_embed": 8,
}  # fmt: skip

# torch.backends.mkldnn.flags warns that TF32 on oneDNN needs an Intel GPU
no_tf32_warning = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")


def _channels_last(images: Float[Tensor, "b k c h w"]) -> Float[Tensor, "b k c h w"]:
    """The same images laid out as shape-world images reach the network (channels last)."""
    return images.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _grads(model: HookedCNN, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Parameter gradients of the OOO cross-entropy of one batch."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model.ooo_scores(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@no_tf32_warning
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the stem's input: images
@pytest.mark.parametrize("overrides", [TINY_CNN, {**TINY_CNN, "stem_kernel": 1, "stem_stride": 2}],
                         ids=["shortcut", "shortcut+stem"])  # fmt: skip
def test_gradients_through_a_small_strided_1x1_conv_are_right(overrides):
    """The backward that crashed runs, and each rerouted conv's weight and input gradients
    equal the plain strided conv's on torch's own (non-oneDNN) kernels, given the same input
    and output gradient, within float rounding (bounded by the same sums over |values|).

    (Per layer: whole-model gradients are no test here, as the instance norm of a nearly
    constant channel amplifies rounding by up to 1 / sqrt(eps).)"""
    model = HookedCNN(cnn_config("cpu", image_size=32, **overrides)).train()
    images, odd = make_toy_ooo(8, image_size=32, seed=0)
    x = _channels_last(images)
    assert x.reshape(32, 3, 32, 32).is_contiguous(memory_format=torch.channels_last)
    rerouted = {
        n: m for n, m in model.named_modules() if isinstance(m, SafeConv2d) and m.rerouted(x)
    }
    want = {"stages.1.blocks.0.shortcut.conv"} | (
        {"stem.conv"} if "stem_stride" in overrides else set()
    )
    assert set(rerouted) == want
    seen: dict[str, dict[str, Tensor | None]] = {}
    for name, conv in rerouted.items():
        conv.register_forward_hook(lambda m, a, o, name=name: seen.update({name: {"x": a[0]}}))
        conv.register_full_backward_hook(
            lambda m, gin, gout, name=name: seen[name].update(gx=gin[0], gy=gout[0])
        )
    got = _grads(model, x, odd)  # the formerly crashing backward
    assert all(torch.isfinite(g).all() for g in got.values())
    for name, conv in rerouted.items():
        inp, gy, gx = seen[name]["x"].detach(), seen[name]["gy"], seen[name]["gx"]
        with torch.backends.mkldnn.flags(enabled=False):
            refs, bounds = [], []
            for f in (lambda t: t, torch.abs):  # the gradients, and their rounding scale
                xi = f(inp).requires_grad_(gx is not None)
                w = f(conv.weight.detach()).requires_grad_()
                y = F.conv2d(xi, w, stride=conv.stride)
                wrt = (w, xi) if gx is not None else (w,)
                (refs if f is not torch.abs else bounds).append(torch.autograd.grad(y, wrt, f(gy)))
        for g, ref, bound in zip((got[name + ".weight"], gx), refs[0], bounds[0]):
            assert ((g - ref).abs() <= 1e-4 * bound + 1e-12).all(), name


def test_cnn_training_on_channels_last_images_runs():
    """``train_cnn_ooo`` (``_train_step``'s ``loss.backward()`` crashed) on the tiny CNN."""
    model = HookedCNN(cnn_config("cpu", image_size=32, **TINY_CNN))
    images, odd = make_toy_ooo(24, image_size=32, seed=1)
    x = _channels_last(images)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = CNNTrainConfig(max_steps=4, eval_every=2, batch_size=8, target_val_acc=None,
                         patience=100, progress=False, seed=0)  # fmt: skip
    res = train_cnn_ooo(model, (x[:16], odd[:16]), (x[16:], odd[16:]), cfg)
    assert res.steps == 4 and len(res.history) == 3
    assert all(math.isfinite(h["val_loss"]) for h in res.history)
    assert all(math.isfinite(h["train_loss"]) for h in res.history[1:])
    if res.best_step > 0:  # the kept weights were trained
        after = dict(model.named_parameters())
        assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    "kernel, stride, c_in, expect",
    [(1, 2, 4, True), (1, 3, 1, True), (1, (2, 1), 7, True),
     (1, 2, STRIDED_1X1_MAX_IN_CHANNELS - 1, True), (1, 2, STRIDED_1X1_MAX_IN_CHANNELS, False),
     (1, 1, 4, False), (3, 2, 4, False)],
)  # fmt: skip
def test_which_convs_are_rerouted_and_that_they_compute_the_same(kernel, stride, c_in, expect):
    torch.manual_seed(0)
    conv = SafeConv2d(c_in, 5, kernel, stride, padding=kernel // 2, bias=True)
    plain = torch.nn.Conv2d(c_in, 5, kernel, stride, padding=kernel // 2, bias=True)
    plain.load_state_dict(conv.state_dict())  # the same parameters and state-dict keys
    for side in (9, 12):  # odd and even sizes: the output shapes must match too
        x = torch.randn(3, c_in, side, side).contiguous(memory_format=torch.channels_last)
        assert conv.rerouted(x) is expect
        assert not conv.rerouted(x.to("meta"))  # CPU tensors only
        y, want = conv(x), plain(x)
        assert y.shape == want.shape
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_no_preset_conv_is_rerouted():
    """The presets' strided 1x1 convs all read >= 16 channels: they compute as before."""
    cpu = torch.empty(1)
    for preset in CNN_PRESETS:
        with torch.device("meta"):
            model = HookedCNN(cnn_config(preset, device="meta"))
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and not any(isinstance(m, SafeConv2d) and m.rerouted(cpu) for m in convs)
