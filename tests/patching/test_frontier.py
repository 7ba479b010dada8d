"""The faithfulness-size frontier: rankings, MIB's CPR / CMD, checked against hand-written
hooks and a hand trapezoid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import corrupted_batch as _batch
from conftest import logit_diff_metric as _metric

from subroutine_circuits.adapters import tl_unit_map
from subroutine_circuits.patching.frontier import (
    MIB_FRACTIONS,
    frontier,
    frontier_rows,
    mask_order,
    random_orders,
    score_order,
    sizes_of,
)


def test_mask_order_puts_the_mask_first():
    keep = torch.tensor([False, True, False, True, False, True])
    # unit 5 is kept with a low logit (a mask pruned after training); unit 0 dropped, high logit
    params = torch.tensor([3.0, 2.0, -1.0, 5.0, 2.0, -4.0])
    order = mask_order(keep, params)
    assert order.tolist() == [3, 1, 5, 0, 4, 2]
    top = torch.zeros(6, dtype=torch.bool)
    top[order[: int(keep.sum())]] = True
    assert torch.equal(top, keep)
    # ties keep unit order; infinite logits are ordered, not NaN
    assert mask_order(torch.zeros(3, dtype=torch.bool), torch.zeros(3)).tolist() == [0, 1, 2]
    inf = torch.tensor([float("inf"), 0.0, float("-inf")])
    assert mask_order(torch.tensor([False, True, True]), inf).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="NaN"):
        mask_order(keep, torch.full((6,), float("nan")))


def test_mask_order_follows_the_units_importance_when_given():
    keep = torch.tensor([True, True, False, True, True, False])
    params = torch.tensor([3.0, 2.0, 5.0, 1.0, 4.0, -1.0])
    # importance lists units most important first; 2 and 5 are not kept, 4 is not listed
    order = mask_order(keep, params, importance=[3, 5, 2, 1, 0])
    assert order.tolist() == [3, 1, 0, 4, 5, 2]  # kept by importance, 4 by logit; dropped too
    assert set(order[: int(keep.sum())].tolist()) == {0, 1, 3, 4}  # still the mask at its size
    for bad in ([0, 0], [9]):
        with pytest.raises(ValueError, match="importance"):
            mask_order(keep, params, importance=bad)


def test_score_and_random_orders():
    s = torch.tensor([0.1, -0.9, 0.5, 0.0])
    assert score_order(s).tolist() == [1, 2, 0, 3]
    assert score_order(s, use_abs=False).tolist() == [2, 0, 3, 1]
    r = random_orders(7, 4, seed=2)
    assert r.shape == (4, 7)
    assert all(torch.equal(o.sort().values, torch.arange(7)) for o in r)
    assert torch.equal(r, random_orders(7, 4, seed=2))
    assert not torch.equal(r, random_orders(7, 4, seed=3))


def test_sizes_are_checked():
    assert sizes_of(MIB_FRACTIONS, 1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    for bad in ((0.0, 0.1), (0.2, 0.1), (0.5, 1.0), ()):
        with pytest.raises(ValueError, match="fractions"):
            sizes_of(bad, 100)


def _hand_metric(model, b, groups, keep):
    """The metric of ``keep`` with every other unit resampled from the corrupted run, by
    explicit hooks."""
    _, corr_cache = model.run_with_cache(b.corr_tokens)
    hooks, start = [], 0
    for grp in groups:
        abl = ~keep[start : start + grp.size]
        start += grp.size

        def fn(act, hook, abl=abl):
            act = act.clone()
            act[:, :, abl] = corr_cache[hook.name][:, :, abl]
            return act

        hooks.append((grp.hook_name, fn))
    return float(_metric(model.run_with_hooks(b.clean_tokens, fwd_hooks=hooks)).mean().detach())


def test_frontier_equals_hand_ablation_and_hand_areas(tiny_model, tiny_tokens):
    b = _batch(tiny_tokens)
    groups = tl_unit_map(tiny_model).groups
    n = sum(g.size for g in groups)
    fractions = (0.05, 0.2, 0.5)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(n, generator=g)
    keep = torch.rand(n, generator=g) < 0.3
    calls = []

    def accuracy(keeps):
        calls.append(keeps.shape[0])
        return keeps.float().mean(1).tolist()  # a stand-in: the circuit's share of units

    res = frontier(
        tiny_model, b, groups, {"s": score_order(scores), "r": random_orders(n, 2, 1)},
        fractions, "resample", accuracy=accuracy, points={"chosen": keep},
    )  # fmt: skip
    m_full = float(_metric(tiny_model(b.clean_tokens)).mean().detach())
    m_empty = float(_metric(tiny_model(b.corr_tokens)).mean().detach())
    assert res.m_full == pytest.approx(m_full, abs=1e-4)
    assert res.m_empty == pytest.approx(m_empty, abs=1e-4)

    def f_of(circuit):
        return (_hand_metric(tiny_model, b, groups, circuit) - m_empty) / (m_full - m_empty)

    curve = res.curves["s"]
    assert curve.sizes == [round(f * n) for f in fractions]
    order = score_order(scores)
    for i, k in enumerate(curve.sizes):
        c = torch.zeros(n, dtype=torch.bool)
        c[order[:k]] = True
        assert curve.faithfulness[i] == pytest.approx(f_of(c), abs=1e-3)
        assert curve.accuracy[i] == pytest.approx(k / n)
    x = np.array([0.0, *fractions, 1.0])
    y = np.array([0.0, *curve.faithfulness, 1.0])
    cpr = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))
    cmd = sum((x[i + 1] - x[i]) * (abs(1 - y[i + 1]) + abs(1 - y[i])) / 2 for i in range(4))
    assert curve.cpr == pytest.approx(cpr) and curve.cmd == pytest.approx(cmd)
    # random rankings: the mean of each order's own curve
    single = [
        frontier(tiny_model, b, groups, {"o": o}, fractions, "resample").curves["o"]
        for o in random_orders(n, 2, 1)
    ]
    mean = np.mean([c.faithfulness for c in single], axis=0)
    assert np.allclose(res.curves["r"].faithfulness, mean, atol=1e-5)
    assert res.curves["r"].n_orders == 2
    assert res.curves["r"].cpr == pytest.approx(np.mean([c.cpr for c in single]), abs=1e-5)
    # the point: its own size and faithfulness; every distinct circuit measured once
    p = res.points["chosen"]
    assert p.size == int(keep.sum()) and p.faithfulness == pytest.approx(f_of(keep), abs=1e-3)
    assert res.acc_full == 1.0 and res.acc_empty == 0.0
    circuits = [_top(o, k, n) for o in (order, *random_orders(n, 2, 1)) for k in curve.sizes]
    circuits += [tuple(keep.tolist()), _top(order, n, n), _top(order, 0, n)]
    assert calls == [len(set(circuits))]  # one call, each distinct circuit once
    rows = frontier_rows(res)
    assert len(rows) == 2 * len(fractions) + 1
    assert {r["kind"] for r in rows} == {"curve", "point"}
    assert all(np.isnan(r["cpr"]) for r in rows if r["kind"] == "point")


def _top(order, k, n):
    c = torch.zeros(n, dtype=torch.bool)
    c[order[:k]] = True
    return tuple(c.tolist())


def test_bad_orders_are_refused(tiny_model, tiny_tokens):
    b = _batch(tiny_tokens)
    groups = tl_unit_map(tiny_model).groups
    n = sum(g.size for g in groups)
    with pytest.raises(ValueError, match="not a permutation"):
        frontier(tiny_model, b, groups, {"x": torch.zeros(n, dtype=torch.long)}, (0.1,))
    with pytest.raises(ValueError, match="shape"):
        frontier(tiny_model, b, groups, {"x": torch.arange(n - 1)}, (0.1,))


def test_frontier_family_curve_is_its_circuits_measured_as_points(tiny_model, tiny_tokens):
    """A family (one circuit per size) gives the curve its circuits give as single points;
    rows of the wrong size or shape are refused by name."""
    from subroutine_circuits.patching.frontier import sizes_of

    b = _batch(tiny_tokens)
    groups = tl_unit_map(tiny_model).groups
    n = sum(g.size for g in groups)
    fractions = (0.05, 0.2, 0.5)
    sizes = sizes_of(fractions, n)
    g = torch.Generator().manual_seed(4)
    fam = torch.zeros(len(sizes), n, dtype=torch.bool)
    for i, k in enumerate(sizes):  # unrelated circuits per size: not one nested ranking
        fam[i, torch.randperm(n, generator=g)[:k]] = True
    res = frontier(tiny_model, b, groups, {}, fractions, "resample", families={"path": fam},
                   points={f"p{i}": row for i, row in enumerate(fam)})  # fmt: skip
    curve = res.curves["path"]
    assert curve.sizes == sizes and curve.n_orders == 1
    for i in range(len(sizes)):
        assert curve.faithfulness[i] == pytest.approx(res.points[f"p{i}"].faithfulness)
    bad = fam.clone()
    bad[0, bad[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="keeps"):
        frontier(tiny_model, b, groups, {}, fractions, families={"path": bad})
    with pytest.raises(ValueError, match="shape"):
        frontier(tiny_model, b, groups, {}, fractions, families={"path": fam[:2]})
