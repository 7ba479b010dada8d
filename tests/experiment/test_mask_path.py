"""The frontier's mask curves (issue 23): the feasible-checkpoint rule of target-density masks,
the mask path trained at the frontier's sizes, and the backward elimination that orders a
1-minimal mask's units; checked against hand-written hooks and the plateau's definition."""

from __future__ import annotations

import math

import pytest
import torch

#: The hand hook and the batched evaluator round differently; a problem whose scores tie
#: within that rounding may flip, so accuracies agree within one of the 40 problems.
ONE_PROBLEM = 1 / 40 + 1e-9


def test_plateau_with_a_target_keeps_only_feasible_checkpoints():
    """Before the first checkpoint at or under the target the latest one stands in and patience
    does not run; after it, denser checkpoints never become the best and count as no gain."""
    from subroutine_circuits.experiment.schedule import Plateau

    p = Plateau(tolerance=0.02, patience=2, max_density=0.1)
    assert p.update(0.99, 0.5, 10) and p.best_step == 10 and not p.feasible
    assert p.update(0.98, 0.3, 20) and p.best_step == 20 and not p.stopped  # latest stands in
    assert p.update(0.97, 0.2, 30) and p.since == 0  # infeasible evaluations never stop it
    assert p.update(0.70, 0.1, 40) and p.feasible and p.best_step == 40  # first feasible wins
    assert not p.update(0.99, 0.2, 50) and p.best_step == 40  # denser again: no improvement
    assert p.update(0.80, 0.05, 60) and p.best_acc == 0.80
    assert not p.update(0.75, 0.05, 70) and not p.update(0.75, 0.05, 80)
    assert p.stopped
    # without a target nothing changes: the most accurate checkpoint, sparser on ties
    free = Plateau(tolerance=0.02, patience=2)
    assert free.feasible and free.update(0.99, 0.5, 10) and not free.update(0.70, 0.1, 20)


def test_elimination_order_removes_the_least_harmful_unit_each_step():
    """Each removal leaves the highest accuracy among the remaining units' removals, measured
    by a hand-written zero hook after every removal; the order lists every kept unit once."""
    from conftest import make_tiny_transformer
    from test_prune_masks import _zero_hook_accuracy

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.experiment.search import elimination_order
    from subroutine_circuits.masks.ablator import Ablator

    model = make_tiny_transformer(seed=5)
    um = tl_unit_map(model)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, 50, (40, 4, 7), generator=g)
    data = EncodedProblems({"tokens": toks, "lengths": torch.full((40, 4), 7)},
                           torch.randint(0, 4, (40,), generator=g))  # fmt: skip
    keep = torch.zeros(um.n_units, dtype=torch.bool)
    keep[torch.randperm(um.n_units, generator=g)[:7]] = True
    order = elimination_order(as_adapter(model, pool="last"), data, keep, um, Ablator("zero"))
    assert sorted(order) == keep.nonzero().flatten().tolist()
    current = keep.clone()
    for unit in order[:-1]:
        accs = {}
        for u in current.nonzero().flatten().tolist():
            without = current.clone()
            without[u] = False
            accs[u] = _zero_hook_accuracy(model, data, without, um)
        assert accs[unit] >= max(accs.values()) - ONE_PROBLEM
        current[unit] = False


@pytest.fixture(scope="module")
def trained_tiny():
    from test_target_density import _trained_setup

    torch.manual_seed(0)
    return _trained_setup()


def test_path_keeps_gives_one_circuit_of_each_size(trained_tiny):
    """Every row keeps exactly its size (none for 0, all for every unit); each trained size's
    log says whether its mask met the target, consistently with its kept count."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.search import encode, path_keeps
    from subroutine_circuits.masks.ablator import Ablator

    cfg, prep, model = trained_tiny
    adapter = as_adapter(model, tokenizer=prep.tokenizer, pool="last").freeze()
    train = encode(adapter, prep.splits["train"]["sub_subject_plural"], "cpu")
    val = encode(adapter, prep.splits["val"]["sub_subject_plural"], "cpu")
    mcfg = MaskSearchConfig(steps=40, eval_every=10, patience=2, target_lr=1.0)
    n = adapter.unit_map(kinds=mcfg.unit_kinds).n_units
    sizes = [0, 3, 3, max(4, n // 10), n]  # a repeated size, as rounded fractions give
    keep, log = path_keeps(adapter, train, val, mcfg, {"l0_weight": 1.0}, 0, sizes,
                           Ablator("zero"))  # fmt: skip
    assert keep.shape == (len(sizes), n)
    assert keep.sum(1).tolist() == sizes
    assert [e["k"] for e in log] == sorted(set(sizes[1:4]))
    assert torch.equal(keep[1], keep[2])
    for e in log:
        assert e["feasible"] == (e["kept"] <= e["k"])
        assert 0 <= e["best_step"] <= e["steps"] <= 40
        assert not math.isnan(e["val_acc"])


def test_frontier_path_needs_the_frontier():
    """``mask.frontier_path`` is refused where nothing would read it."""
    from subroutine_circuits.experiment import config_from_dict

    base = {"task": "agreement_singular", "mask": {"frontier_path": True}}
    with pytest.raises(ValueError, match="frontier_path"):
        config_from_dict({**base, "patching": False}).validate()
    with pytest.raises(ValueError, match="frontier_path"):
        config_from_dict({**base, "patching_options": {"frontier": False}}).validate()
    config_from_dict(base).validate()


def test_addition_order_adds_the_most_helpful_unit_each_step(monkeypatch):
    """Each addition leaves the highest accuracy among the candidates' additions (hand-written
    zero hook), only dropped units are added, and it stops at the size asked for; with a
    candidate cap only the dropped units of highest logit are considered."""
    from conftest import make_tiny_transformer
    from test_prune_masks import _zero_hook_accuracy

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.experiment import search
    from subroutine_circuits.experiment.search import addition_order
    from subroutine_circuits.masks.ablator import Ablator

    model = make_tiny_transformer(seed=6)
    um = tl_unit_map(model)
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(1, 50, (40, 4, 7), generator=g)
    data = EncodedProblems({"tokens": toks, "lengths": torch.full((40, 4), 7)},
                           torch.randint(0, 4, (40,), generator=g))  # fmt: skip
    keep = torch.zeros(um.n_units, dtype=torch.bool)
    keep[torch.randperm(um.n_units, generator=g)[:3]] = True
    params = torch.randn(um.n_units, generator=g)
    monkeypatch.setattr(search, "ADD_CANDIDATES", um.n_units)  # every dropped unit
    added = addition_order(as_adapter(model, pool="last"), data, keep, um, Ablator("zero"),
                           params, 7)  # fmt: skip
    assert len(added) == 4 and len(set(added)) == 4 and not keep[added].any()
    current = keep.clone()
    for unit in added:
        accs = {}
        for u in (~current).nonzero().flatten().tolist():
            plus = current.clone()
            plus[u] = True
            accs[u] = _zero_hook_accuracy(model, data, plus, um)
        assert accs[unit] >= max(accs.values()) - ONE_PROBLEM
        current[unit] = True
    monkeypatch.setattr(search, "ADD_CANDIDATES", 5)
    dropped = (~keep).nonzero().flatten()
    top5 = set(dropped[torch.sort(-params[dropped]).indices[:5]].tolist())
    capped = addition_order(as_adapter(model, pool="last"), data, keep, um, Ablator("zero"),
                            params, 20)  # fmt: skip
    assert set(capped) == top5  # the candidates run out before 20 units
