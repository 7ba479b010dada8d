"""K fixed masks evaluated in one pass == each ``UnitMask.fixed`` alone; matched random draws."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_transformer

from subroutine_circuits.adapters import as_adapter, tl_unit_map
from subroutine_circuits.experiment.batched import (
    evaluate_fixed_masks,
    fixed_mask_scores,
    matched_random_masks,
    n_distinct,
)
from subroutine_circuits.experiment.search import EncodedProblems
from subroutine_circuits.experiment.search import accuracy as _accuracy
from subroutine_circuits.masks import UnitMask
from subroutine_circuits.models import ooo_logits


def make_problems(n: int, pos: int, seed: int) -> EncodedProblems:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, 50, (n, 4, pos), generator=g)
    lens = torch.randint(3, pos + 1, (n, 4), generator=g)
    toks = toks * (torch.arange(pos)[None, None, :] < lens[..., None])
    return EncodedProblems(
        {"tokens": toks, "lengths": lens}, torch.randint(0, 4, (n,), generator=g)
    )


def accuracy(model, data, pool, mask):
    return _accuracy(as_adapter(model, pool=pool), data, mask)


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_transformer(seed=2)
    model.requires_grad_(False)
    um = tl_unit_map(model)
    data = make_problems(37, 11, seed=0)
    g = torch.Generator().manual_seed(1)
    keep = (
        torch.rand(6, um.n_units, generator=g)
        < torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])[:, None]
    )
    masks = [UnitMask.fixed(um, k, ablation="zero") for k in keep]
    ref = make_problems(10, 11, seed=9)
    b, k, pos = ref.tokens.shape
    for kk in keep[:3]:
        m = UnitMask.fixed(um, kk, ablation="mean")
        flat = {"tokens": ref.tokens.reshape(b * k, pos), "lengths": ref.lengths.reshape(b * k)}
        m.set_mean(as_adapter(model), flat)
        masks.append(m)
    return model, um, data, masks


@pytest.mark.parametrize("max_rows", [8192, 24])  # one pass, or chunked masks and problems
def test_fixed_masks_equal_each_mask_alone(setup, max_rows):
    model, um, data, masks = setup
    scores = fixed_mask_scores(model, data, masks, "last", max_rows=max_rows)
    acc = evaluate_fixed_masks(model, data, masks, "last", max_rows=max_rows)
    assert scores.shape == (len(masks), len(data), 4)
    for i, m in enumerate(masks):
        with torch.no_grad(), m.applied(model):
            ref = ooo_logits(model, data.tokens, data.lengths, "last")
        torch.testing.assert_close(scores[i], ref, rtol=1e-4, atol=1e-5)
        assert acc[i].item() == pytest.approx(accuracy(model, data, "last", m))
    # the conditions differ: the evaluation is not constant across masks
    assert len({round(a, 6) for a in acc.tolist()}) > 2


def test_tensor_input_with_shared_mean_values(setup):
    model, um, data, masks = setup
    keep = torch.stack([m.flat_binary() for m in masks[6:]])
    acc = evaluate_fixed_masks(
        model, data, keep, "last", unit_map=um, ablation_values=masks[6].ablation_values
    )
    alone = accuracy(model, data, "last", masks[6])
    assert acc[0].item() == pytest.approx(alone)
    with pytest.raises(ValueError, match="needs unit_map"):
        evaluate_fixed_masks(model, data, keep, "last")
    with pytest.raises(ValueError, match="expected"):
        evaluate_fixed_masks(model, data, keep[:, :5], "last", unit_map=um)


def test_matched_random_masks_keep_counts_per_layer_and_kind(setup):
    _, um, _, masks = setup
    keep = masks[1].flat_binary()
    draws = matched_random_masks(um, keep, n_draws=25, seed=3)
    assert draws.shape == (25, um.n_units) and draws.dtype == torch.bool
    for off, g in zip(um.offsets(), um.groups):
        want = int(keep[off : off + g.size].sum())
        assert (draws[:, off : off + g.size].sum(1) == want).all()
    assert n_distinct(draws) == 25  # 64 neurons per layer: draws differ
    assert torch.equal(draws, matched_random_masks(um, keep, 25, seed=3))
    assert not torch.equal(draws, matched_random_masks(um, keep, 25, seed=4))
    # every unit of a group is reachable (the draws are not stuck on a subset)
    off, g = um.offsets()[1], um.groups[1]
    assert draws[:, off : off + g.size].any(0).float().mean() > 0.9
    with pytest.raises(ValueError, match="expected"):
        matched_random_masks(um, keep[:-1], 3, 0)
    with pytest.raises(ValueError, match="n_draws"):
        matched_random_masks(um, keep, 0, 0)


def test_random_draws_evaluated_in_one_pass(setup):
    """The matched-null use: 20 ablated random draws at once == one at a time."""
    model, um, data, masks = setup
    draws = matched_random_masks(um, masks[0].flat_binary(), 20, seed=0)
    acc = evaluate_fixed_masks(model, data, ~draws, "last", unit_map=um)
    for i in (0, 7, 19):
        alone = accuracy(model, data, "last", UnitMask.fixed(um, ~draws[i]))
        assert acc[i].item() == pytest.approx(alone)
