"""Batched unit masks: K masks in one forward pass equal K separate masks (hooks slice by
slice, the stacked optimiser, training through the converged engine with the whole budget)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_transformer

from subroutine_circuits.adapters import as_adapter, tl_unit_map
from subroutine_circuits.experiment.batched import BatchedUnitMask, StackedAdam, mix_slices
from subroutine_circuits.experiment.config import MaskSearchConfig
from subroutine_circuits.experiment.converge import mask_schedule, train_masks_converged
from subroutine_circuits.experiment.search import EncodedProblems
from subroutine_circuits.experiment.search import train_mask as _train_mask
from subroutine_circuits.masks import MaskConfig, UnitMask, load_mask, save_mask
from subroutine_circuits.masks.ablator import Ablator


def make_problems(n: int, pos: int, seed: int, min_len: int = 3) -> EncodedProblems:
    """Random OOO problems, right-padded with 0, lengths in [min_len, pos]."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, 50, (n, 4, pos), generator=g)
    lens = torch.randint(min_len, pos + 1, (n, 4), generator=g)
    toks = toks * (torch.arange(pos)[None, None, :] < lens[..., None])
    odd = torch.randint(0, 4, (n,), generator=g)
    return EncodedProblems({"tokens": toks, "lengths": lens}, odd)


def train_mask(model, train, cfg, hp, seed, pool):
    """The reference: one ``experiment.search.train_mask`` run (no validation, whole budget)."""
    return _train_mask(as_adapter(model, pool=pool), train, cfg, hp, seed)


def train_masks_batched(model, train, cfg, hps, seeds, pool="last", noise="auto"):
    """K masks in one loop of the converged engine over the whole budget (no early stop, one
    evaluation at the end, zero ablation): the batched counterpart of :func:`train_mask`."""
    sched = mask_schedule(
        MaskSearchConfig(steps=cfg.steps, eval_every=cfg.steps, patience=0,
                         batch_size=cfg.batch_size), len(train),
    )  # fmt: skip
    runs = train_masks_converged(
        model, train, train, cfg, hps, seeds, sched, Ablator("zero"), pool, noise=noise
    )
    return [r.mask for r in runs]


def logits_of(mask: UnitMask) -> torch.Tensor:
    """Flat mask logits (log_alpha or s) of an unbatched / trained UnitMask."""
    out = []
    for p in mask.parts:
        out.append((p.log_alpha if hasattr(p, "log_alpha") else p.logits).detach().reshape(-1))
    return torch.cat(out)


# How far two float32 trainings of the same masks by different code paths (batched vs one at
# a time, other batch companions) may drift apart: their rounding differs (batch layout, and
# oneDNN's AVX2 and AVX-512 kernels round differently), and tens of Adam steps grow it to
# about 1e-5 (2.5e-5 measured under ONEDNN_MAX_CPU_ISA=AVX2, issue 21). A real difference (a
# wrong row, data order, noise or learning rate) moves logits by about one step (lr >= 0.05).
TRAINED_ATOL = 1e-4


def assert_same_training(got: UnitMask, ref: UnitMask, atol: float = TRAINED_ATOL) -> None:
    """``got`` and ``ref`` are the same training up to float rounding: logits within ``atol``
    (and 1e-4 relative), binary masks equal except where a logit lies within that distance of
    the decision edge (0 for the default stretch interval and for continuous masks)."""
    la, lb = logits_of(ref), logits_of(got)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=atol)
    differ = ref.flat_binary() != got.flat_binary()
    assert (la[differ].abs() <= atol + 1e-4 * la[differ].abs()).all(), la[differ]


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(seed=3)


HPS = [{"l0_weight": 0.5}, {"l0_weight": 4.0, "lr": 0.3}, {"init": 1.0, "lr": 0.05}]
SEEDS = [0, 7, 2]


def test_mean_pool_bidirectional_equals_separate_runs():
    m = make_tiny_transformer(seed=1, attention_dir="bidirectional")
    train = make_problems(16, 10, seed=2)
    cfg = MaskSearchConfig(steps=15, batch_size=4)
    ref = [train_mask(m, train, cfg, hp, s, "mean") for hp, s in zip(HPS[:2], SEEDS[:2])]
    got = train_masks_batched(m, train, cfg, HPS[:2], SEEDS[:2], "mean", noise="exact")
    for a, b in zip(ref, got):
        assert_same_training(b, a)


def test_stacked_adam_equals_torch_adam_param_groups():
    """One [K, n] tensor with per-row lr == torch.optim.Adam with K param groups."""
    g = torch.Generator().manual_seed(0)
    init = torch.randn(3, 17, generator=g)
    lrs = [0.1, 0.01, 0.5]
    rows = [torch.nn.Parameter(init[i].clone()) for i in range(3)]
    opt = torch.optim.Adam([{"params": [r], "lr": lr} for r, lr in zip(rows, lrs)])
    stacked = torch.nn.Parameter(init.clone())
    sopt = StackedAdam(stacked, lrs)
    target = torch.randn(3, 17, generator=g)
    for _ in range(25):
        opt.zero_grad()
        sum(((r - t) ** 3).sum() for r, t in zip(rows, target)).backward()
        opt.step()
        sopt.zero_grad()
        ((stacked - target) ** 3).sum().backward()
        sopt.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([r.detach() for r in rows]))
    assert not torch.allclose(stacked.detach(), init)
    with pytest.raises(ValueError, match="learning rates"):
        StackedAdam(stacked, [0.1, 0.2])


@pytest.mark.parametrize("parametrization", ["hard_concrete", "continuous"])
def test_hooks_equal_unit_masks_slice_by_slice_with_mean_ablation(model, parametrization):
    """Each slice of a batched forward == that mask's own UnitMask forward (mean ablation)."""
    um = tl_unit_map(model)
    tokens = torch.randint(1, 50, (5, 9), generator=torch.Generator().manual_seed(0))
    cfgs = [
        MaskConfig(parametrization=parametrization, init=0.3, ablation="mean", seed=s)
        for s in (0, 1)
    ]
    singles = [UnitMask(um, c) for c in cfgs]
    for i, s in enumerate(singles):
        ref_tokens = torch.randint(1, 50, (4, 9), generator=torch.Generator().manual_seed(10 + i))
        s.set_mean(as_adapter(model), ref_tokens)
    bm = BatchedUnitMask(um, cfgs, [s.ablation_values for s in singles], noise="exact")
    with torch.no_grad():
        bm.logits.normal_(generator=torch.Generator().manual_seed(5))
        for k, s in enumerate(singles):
            flat = bm.logits[k]
            for part, sl in zip(s.parts, bm.slices):
                (part.log_alpha if parametrization == "hard_concrete" else part.logits).copy_(
                    flat[sl]
                )
    for mode in ("train", "eval"):
        getattr(bm, mode)()
        with torch.no_grad(), bm.applied(model):
            out = model(tokens.repeat(2, 1))
        for k, s in enumerate(singles):
            getattr(s, mode)()
            with torch.no_grad(), s.applied(model):
                ref = model(tokens)
            torch.testing.assert_close(out[k * 5 : (k + 1) * 5], ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(bm.binary()[0], singles[0].flat_binary())


def test_device_noise_is_reproducible_per_seed(model):
    """noise='device': a mask's result depends on its own seed, not on its batch companions."""
    train = make_problems(20, 8, seed=3)
    cfg = MaskSearchConfig(steps=10, batch_size=4)
    a = train_masks_batched(model, train, cfg, [{}, {}], [4, 5], "last", noise="device")
    b = train_masks_batched(
        model, train, cfg, [{"l0_weight": 9.0}, {}], [6, 4], "last", noise="device"
    )
    assert_same_training(b[1], a[0])
    assert not torch.allclose(logits_of(a[0]), logits_of(a[1]))


def test_unbatched_masks_save_and_load(model, tmp_path):
    train = make_problems(12, 8, seed=3)
    cfg = MaskSearchConfig(steps=5, batch_size=4)
    masks = train_masks_batched(model, train, cfg, [{}, {"lr": 0.5}], [0, 1], "last")
    save_mask(tmp_path / "m.pt", masks[1], model)
    back = load_mask(tmp_path / "m.pt", model)
    assert torch.equal(back.flat_binary(), masks[1].flat_binary())
    torch.testing.assert_close(logits_of(back), logits_of(masks[1]))


def test_bad_input_is_named(model):
    train = make_problems(12, 8, seed=3)
    cfg = MaskSearchConfig(steps=5, batch_size=4)
    with pytest.raises(ValueError, match="one seed per"):
        train_masks_batched(model, train, cfg, [{}, {}], [0])
    with pytest.raises(ValueError, match="unknown noise"):
        BatchedUnitMask(tl_unit_map(model), [MaskConfig()], noise="gpu")
    with pytest.raises(ValueError, match="share parametrization"):
        BatchedUnitMask(
            tl_unit_map(model),
            [MaskConfig(), MaskConfig(parametrization="continuous")],
        )
    with pytest.raises(ValueError, match="equal mask slices"):
        mix_slices(torch.ones(5, 3), torch.ones(2, 3), axis=1)
    um = tl_unit_map(model)
    with pytest.raises(ValueError, match="mean ablation but has no ablation values"):
        BatchedUnitMask(um, [MaskConfig(ablation="mean")])
