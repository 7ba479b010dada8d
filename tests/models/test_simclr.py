"""SimCLR: NT-Xent against a loop, predicate-preserving augmentations, pretraining, head reset."""

from __future__ import annotations

import math

import pytest
import torch

from subroutine_circuits.models.augment import (
    AugmentConfig,
    augment_images,
    foreground,
    warp_white,
)
from subroutine_circuits.models.cnn import CNNConfig, HookedCNN
from subroutine_circuits.models.cnn_train import make_toy_ooo
from subroutine_circuits.models.simclr import SimCLRConfig, cosine_lr, nt_xent, simclr_pretrain


def nt_xent_loop(z1, z2, t):
    """Reference NT-Xent, written as the SimCLR paper's per-pair formula with python loops."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("t", [0.07, 0.5])
def test_nt_xent_matches_loop(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert float(nt_xent(z1.double(), z2.double(), t)) == pytest.approx(nt_xent_loop(z1, z2, t))
    # identical views with orthogonal items: the loss is near zero
    eye = torch.eye(4) * 3
    assert float(nt_xent(eye, eye, 0.07)) < 1e-5
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(z1[:1], z2[:1])


@pytest.fixture(scope="module")
def shapes():
    images, _ = make_toy_ooo(48, 32, seed=2)
    return images.reshape(-1, 3, 32, 32)[:96]


def test_augment_keeps_white_background_and_objects(shapes):
    g = torch.Generator().manual_seed(0)
    x01 = shapes * 0.1 + 0.9
    for _ in range(3):
        y01 = augment_images(shapes, None, g) * 0.1 + 0.9
        assert y01.shape == shapes.shape
        fy = foreground(y01)
        assert torch.allclose(y01.masked_select(~fy), torch.tensor(1.0), atol=1e-6)  # white
        assert float(y01.masked_select(fy.expand_as(y01)).view(3, -1).min(0).values.max()) < 0.97
        nx, ny = foreground(x01).sum((1, 2, 3)).float(), fy.sum((1, 2, 3)).float()
        ratio = ny / nx
        assert float(ratio.min()) > 0.5 and float(ratio.max()) < 1.5
        assert abs(float(ratio.mean()) - 1.0) < 0.15  # roughly the same amount of ink


def test_augment_never_cuts_objects_and_is_seeded(shapes):
    """Large translations would push objects off the canvas: those images keep only the flip."""
    cfg = AugmentConfig(translate=0.6, affine_p=1.0, rotation_deg=0.0, affine_deg=0.0,
                        shear_deg=0.0, scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0)  # fmt: skip
    y = augment_images(shapes, cfg, torch.Generator().manual_seed(1))
    nx = foreground(shapes * 0.1 + 0.9).sum((1, 2, 3))
    ny = foreground(y * 0.1 + 0.9).sum((1, 2, 3))
    assert torch.equal(nx, ny)  # pure translations: every pixel kept
    cut = augment_images(shapes, AugmentConfig(**{**cfg.__dict__, "keep_on_canvas": False}),
                         torch.Generator().manual_seed(1))  # fmt: skip
    assert bool((foreground(cut * 0.1 + 0.9).sum((1, 2, 3)) < nx).any())  # the guard matters
    a = augment_images(shapes, None, torch.Generator().manual_seed(5))
    b = augment_images(shapes, None, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_augment_special_cases(shapes):
    off = dict(hflip_p=0.0, rotation_deg=0.0, affine_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(augment_images(shapes, AugmentConfig(**off), g), shapes, atol=1e-5)
    flip = AugmentConfig(**{**off, "hflip_p": 1.0})
    assert torch.allclose(augment_images(shapes, flip, g), shapes.flip(-1), atol=1e-5)
    gray = augment_images(shapes, AugmentConfig(**{**off, "grayscale_p": 1.0}), g)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    # (x, y) -> (-y, x) with y pointing down is a clockwise quarter turn: torch.rot90(k=-1);
    # a shift moves pixels exactly
    rot = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]]).expand(len(shapes), 2, 2)
    zero_t = torch.zeros(len(shapes), 2)
    x01 = shapes * 0.1 + 0.9
    assert torch.allclose(warp_white(x01, rot, zero_t), x01.rot90(-1, dims=(-2, -1)), atol=1e-6)
    shift = torch.tensor([[2 * 3 / 32, 0.0]]).expand(len(shapes), 2)  # 3 px to the right
    moved = warp_white(x01, torch.eye(2).expand(len(shapes), 2, 2), shift)
    assert torch.allclose(moved[..., 3:], x01[..., :-3], atol=1e-6)
    assert bool((moved[..., :3] == 1.0).all())  # white fill
    with pytest.raises(ValueError, match="square"):
        augment_images(torch.zeros(2, 3, 8, 10))
    with pytest.raises(ValueError, match="hflip_p"):
        AugmentConfig(hflip_p=2.0)


def test_cosine_lr_endpoints():
    assert cosine_lr(0, 100, 5e-4, 1 / 50) == pytest.approx(5e-4)
    assert cosine_lr(100, 100, 5e-4, 1 / 50) == pytest.approx(1e-5)
    assert cosine_lr(50, 100, 5e-4, 1 / 50) == pytest.approx((5e-4 + 1e-5) / 2)
    assert cosine_lr(10, 100, 5e-4, 1 / 50, time_frac=0.5) == pytest.approx((5e-4 + 1e-5) / 2)
    assert cosine_lr(10, 100, 5e-4, 1 / 50, time_frac=1.7) == pytest.approx(1e-5)


def test_simclr_pretrain_learns_and_resets_head(shapes):
    cfg = CNNConfig(image_size=32, stem_channels=8, stage_widths=(8, 16, 16),
                    stage_channels=(8, 16, 16), stage_blocks=(1, 1, 1), stage_strides=(1, 2, 2),
                    d_hidden=32, d_embed=16)  # fmt: skip
    model = HookedCNN(cfg)
    trunk0 = model.stem.conv.weight.detach().clone()
    info = simclr_pretrain(model, shapes, SimCLRConfig(epochs=8, batch_size=32, lr=2e-3,
                                                       progress=False, seed=0))  # fmt: skip
    assert info["steps"] == 8 * 3 and info["head_reset"]
    assert info["history"][-1]["loss"] < info["history"][0]["loss"] - 0.3
    assert not torch.equal(model.stem.conv.weight, trunk0)  # the trunk was trained
    fresh = HookedCNN(cfg)
    fresh.reset_head(0)
    for k, v in model.head.state_dict().items():  # head re-initialised like a fresh one
        assert torch.equal(v, fresh.head.state_dict()[k])
    with pytest.raises(ValueError, match="at least 2 images"):
        simclr_pretrain(model, shapes[:1], SimCLRConfig(progress=False))
    with pytest.raises(ValueError, match="batch_size"):
        SimCLRConfig(batch_size=1).validate()
