"""Mask training on a toy objective where only a known subset of units matters.

The target is the output of the frozen tiny model with a fixed 30% of its units kept (all other
heads/neurons zero-ablated). A trainable unit mask with an L0 penalty must find a sparse
subnetwork (density < 0.5) that reproduces this target, while a random mask of the same size
does not.
"""

from __future__ import annotations

import pytest
import torch

from subroutine_circuits.adapters import tl_unit_map
from subroutine_circuits.masks import MaskConfig, UnitMask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster single-threaded on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(model):
    model.requires_grad_(False)
    tokens = torch.randint(1, 50, (16, 10), generator=torch.Generator().manual_seed(1))
    um = tl_unit_map(model)
    n = um.n_units
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    target_keep = torch.zeros(n, dtype=torch.bool)
    target_keep[perm[: int(0.3 * n)]] = True
    with torch.no_grad():
        with UnitMask.fixed(um, target_keep).applied(model):
            target = model(tokens)
        base_loss = float(((model(tokens) - target) ** 2).mean())
    return tokens, um, target_keep, target, base_loss


def _train(model, mask, tokens, target, steps, lr, lam, anneal_every=0):
    """Adam on the mask parameters: MSE to the target + lam * penalty / n_units."""
    n = mask.unit_map.n_units
    opt = torch.optim.Adam(mask.parameters(), lr=lr)
    mask.train()
    with mask.applied(model):
        for step in range(steps):
            loss = ((model(tokens) - target) ** 2).mean()
            total = loss + lam * mask.penalty() / n
            opt.zero_grad()
            total.backward()
            opt.step()
            if anneal_every and (step + 1) % anneal_every == 0:
                mask.step_temperature()
    mask.eval()


def _eval_loss(model, mask, tokens, target) -> float:
    with torch.no_grad(), mask.applied(model):
        return float(((model(tokens) - target) ** 2).mean())


@pytest.mark.parametrize(
    "cfg, anneal_every, max_ratio",
    [
        (MaskConfig(parametrization="hard_concrete", init=2.0, seed=0), 0, 0.12),
        (MaskConfig(parametrization="continuous", init=1.0, temp_growth=1.3, seed=0), 10, 0.2),
    ],
    ids=["hard_concrete", "continuous"],
)
def test_mask_training_finds_sparse_subnetwork(tiny_model, cfg, anneal_every, max_ratio):
    model = tiny_model
    tokens, um, target_keep, target, base_loss = _setup(model)
    mask = UnitMask(um, cfg)
    assert mask.density() == 1.0
    _train(model, mask, tokens, target, steps=200, lr=0.1, lam=1.0, anneal_every=anneal_every)
    if anneal_every:
        assert float(mask.parts[0].temperature) == pytest.approx(1.3**20, rel=1e-4)
    # gradients went to the mask only
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in mask.parameters())
    density = mask.density()
    loss = _eval_loss(model, mask, tokens, target)
    kept = mask.flat_binary()
    precision = float((kept & target_keep).sum()) / max(1, int(kept.sum()))
    # sparse, keeps the objective, and keeps (almost) only units that matter
    assert density < 0.5
    assert loss < max_ratio * base_loss
    assert precision >= 0.9
    # control: random masks of the same size are far worse
    rnd = [_eval_loss(model, UnitMask.random_like(mask, seed=s), tokens, target) for s in range(3)]
    assert min(rnd) > 3 * loss
    # stats agree with the flat mask
    st = mask.stats()
    assert sum(r["kept"] for r in st) == int(kept.sum())
    assert sum(r["n"] for r in st) == um.n_units
