"""Scoring against a planted truth: ROC AUC, precision/recall, mask scores, csv rows."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch

from subroutine_circuits.groundtruth.planted import truth_vector
from subroutine_circuits.groundtruth.scoring import (
    ROW_FIELDS,
    error_rates,
    groundtruth_row,
    mask_row,
    mask_unit_scores,
    precision_recall,
    score_units,
    top_k_kept,
)


def _pairwise_auc(scores, truth):
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_score_units_matches_pairwise_count_with_ties():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 25)
        scores = [float(rng.randint(-3, 3)) for _ in range(n)]  # many ties
        truth = [rng.random() < 0.4 for _ in range(n)]
        if all(truth) or not any(truth):
            continue
        assert score_units(scores, truth) == pytest.approx(_pairwise_auc(scores, truth))


def test_score_units_extremes_and_errors():
    truth = torch.tensor([True, True, False, False, False])
    assert score_units(torch.tensor([5.0, 4.0, 1.0, 2.0, 3.0]), truth) == 1.0
    assert score_units(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), truth) == 0.0
    assert score_units(torch.zeros(5), truth) == 0.5
    assert math.isnan(score_units(torch.ones(3), torch.ones(3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="align"):
        score_units(torch.ones(4), truth)
    with pytest.raises(ValueError, match="NaN"):
        score_units(torch.tensor([0.0, float("nan"), 1, 2, 3]), truth)


def test_precision_recall_by_hand():
    truth = [True, True, True, False, False, False]
    kept = [True, False, False, True, False, False]
    assert precision_recall(kept, truth) == (0.5, pytest.approx(1 / 3))
    p, r = precision_recall([False] * 6, truth)
    assert math.isnan(p) and r == 0.0
    with pytest.raises(ValueError, match="boolean"):
        precision_recall([0.5] * 6, truth)


def test_top_k_kept():
    keep = top_k_kept(torch.tensor([0.1, 3.0, -1.0, 3.0, 2.0]), 3)
    assert keep.tolist() == [False, True, False, True, True]
    with pytest.raises(ValueError):
        top_k_kept(torch.zeros(3), 4)


def test_mask_scores_and_row_on_a_unit_mask(tiny_model):
    from subroutine_circuits.adapters.transformer_lens import tl_unit_map
    from subroutine_circuits.masks import MaskConfig, UnitMask

    um = tl_unit_map(tiny_model)
    mask = UnitMask(um, MaskConfig(parametrization="hard_concrete", init=0.0))
    units = um.units()
    truth = {u for u in units if u[0] == 0 and u[1] == "head"}
    with torch.no_grad():
        for g, p in zip(um.groups, mask.parts):
            # planted heads of layer 0 get high log_alpha, everything else low, one miss
            vals = torch.full(p.log_alpha.shape, -3.0)
            if g.kind == "head" and g.layer == 0:
                vals[:] = 3.0
                vals[0] = -4.0  # a planted unit the mask missed
            p.log_alpha.copy_(vals)
    mask.eval()
    scores = mask_unit_scores(mask)
    assert scores.shape == (um.n_units,)
    want = torch.cat([p.log_alpha.detach().reshape(-1) for p in mask.parts])
    assert torch.equal(scores, want)
    planted = SimpleNamespace(
        kind="modular", seed=3, truth={"a": frozenset(truth), "b": frozenset()},
        subroutines=("a", "b"), units=lambda: units,
        truth_vector=lambda sub, u: truth_vector(frozenset(truth), u),
        parts={"A": {"units": frozenset(truth), "computes": ("a",)},
               "B": {"units": frozenset(), "computes": ("b",)}},
    )  # fmt: skip
    row = mask_row(planted, "a", mask, verdict=True)
    assert row["copies_touched"] == 1
    assert tuple(row) == ROW_FIELDS
    n_pos, n_neg = len(truth), um.n_units - len(truth)
    # the missed unit ranks below every negative: AUC = 1 - n_neg / (n_pos * n_neg)
    assert row["roc_auc"] == pytest.approx(1 - n_neg / (n_pos * n_neg))
    assert row["precision"] == 1.0 and row["recall"] == pytest.approx((n_pos - 1) / n_pos)
    assert row["n_kept"] == n_pos - 1 and row["n_truth"] == n_pos and row["verdict"] is True


def test_row_without_truth_and_error_rates():
    planted = SimpleNamespace(
        kind="redundant", seed=0, truth=None, subroutines=("a", "b"),
        units=lambda: [(0, "head", i) for i in range(4)],
    )  # fmt: skip
    row = groundtruth_row(planted, "a", "activation", [0.1, -2.0, 0.3, 0.0], use_abs=True)
    assert math.isnan(row["roc_auc"]) and math.isnan(row["precision"])
    with pytest.raises(ValueError, match="subroutine"):
        groundtruth_row(planted, "c", "activation", [0.0] * 4)
    with pytest.raises(ValueError, match="4 units"):
        groundtruth_row(planted, "a", "activation", [0.0] * 3)
    rows = [
        {"model_kind": "modular", "verdict": True},
        {"model_kind": "modular", "verdict": False},
        {"model_kind": "redundant", "verdict": False},
        {"model_kind": "redundant", "verdict": True},
        {"model_kind": "redundant", "verdict": "search failed"},
        {"model_kind": "random_init", "verdict": True},
        {"model_kind": "random_init", "verdict": None},
    ]
    rates = error_rates(rows)
    # redundant models count as non-compositional, like random-init ones: 2 of 3 usable
    # non-compositional runs were called compositional
    assert rates["missed_compositional"] == 0.5
    assert rates["false_compositional"] == pytest.approx(2 / 3)
    assert rates["n_non_compositional"] == 3
    assert rates["per_kind"]["redundant"] == {
        "expected": "not compositional",
        "n": 2,
        "n_compositional": 1,
        "error": 0.5,
    }
    assert rates["all_runs"]["redundant"] == {"runs": 3, "called_compositional": 1}
