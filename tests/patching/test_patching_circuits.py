"""Circuits from scores, faithfulness curves and comparison statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import corrupted_batch as _batch
from conftest import logit_diff_metric as _metric
from scipy import stats

from subroutine_circuits.adapters import tl_unit_map
from subroutine_circuits.patching.activation import activation_patching
from subroutine_circuits.patching.circuits import (
    ablate_units,
    circuit_metrics,
    curve_areas,
    faithfulness_curve,
    smallest_faithful_circuit,
    threshold_circuit,
    top_k_circuit,
)
from subroutine_circuits.patching.compare import compare_with_mask, jaccard, roc_auc, spearman


def test_selection():
    s = torch.tensor([0.1, -0.9, 0.5, 0.0, 0.3])
    assert top_k_circuit(s, 2).tolist() == [False, True, True, False, False]
    assert top_k_circuit(s, 2, use_abs=False).tolist() == [False, False, True, False, True]
    assert threshold_circuit(s, 0.3).tolist() == [False, True, True, False, True]
    with pytest.raises(ValueError, match="k=9"):
        top_k_circuit(s, 9)


def test_circuit_metrics_equal_hand_ablation(tiny_model, tiny_tokens):
    """Batched circuit evaluation equals running each circuit with explicit hooks."""
    b = _batch(tiny_tokens)
    groups = tl_unit_map(tiny_model).groups
    n = 2 * 4 + 2 * 64
    g = torch.Generator().manual_seed(3)
    keeps = torch.rand(3, n, generator=g) < 0.5
    _, corr_cache = tiny_model.run_with_cache(b.corr_tokens)
    _, clean_cache = tiny_model.run_with_cache(b.clean_tokens)
    # mean ablation: per unit, the mean over clean and corrupted examples and positions
    means = {
        grp.hook_name: torch.cat([clean_cache[grp.hook_name], corr_cache[grp.hook_name]]).mean(
            (0, 1)
        )
        for grp in groups
    }
    for ablation in ("zero", "resample", "mean"):
        got = circuit_metrics(tiny_model, b, groups, keeps, ablation, chunk_rows=12)
        for c in range(3):
            hooks, start = [], 0
            for grp in groups:
                abl = ~keeps[c, start : start + grp.size]
                start += grp.size

                def fn(act, hook, abl=abl, ablation=ablation):
                    act = act.clone()
                    if ablation == "zero":
                        act[:, :, abl] = 0
                    elif ablation == "resample":
                        act[:, :, abl] = corr_cache[hook.name][:, :, abl]
                    else:
                        act[:, :, abl] = means[hook.name][abl]
                    return act

                hooks.append((grp.hook_name, fn))
            ref = float(_metric(tiny_model.run_with_hooks(b.clean_tokens, fwd_hooks=hooks)).mean())
            assert abs(float(got[c]) - ref) < 1e-4


def test_ablate_units_context_uses_mean(tiny_model, tiny_tokens):
    groups = tl_unit_map(tiny_model, kinds=("head",)).groups
    ablated = torch.zeros(8, dtype=torch.bool)
    ablated[5] = True  # layer 1, head 1
    value = {g.hook_name: torch.full((4, 8), 0.25) for g in groups}
    seen = {}
    with ablate_units(tiny_model, groups, ablated, value):
        # registered after the ablation hook, so it sees the ablated activation
        tiny_model.add_hook("blocks.1.attn.hook_z", lambda a, hook: seen.update(z=a.clone()))
        tiny_model(tiny_tokens)
    tiny_model.reset_hooks()
    assert torch.all(seen["z"][:, :, 1] == 0.25)
    assert not torch.all(seen["z"][:, :, 0] == 0.25)


def test_faithfulness_curve_and_smallest(tiny_model, tiny_tokens):
    b = _batch(tiny_tokens)
    groups = tl_unit_map(tiny_model).groups
    scores = activation_patching(tiny_model, b.clean_tokens, b.corr_tokens, _metric, groups).flat()
    curve = faithfulness_curve(tiny_model, b, groups, scores, ablation="resample")
    assert curve.fractions[0] == 0 and curve.fractions[-1] == 1
    assert abs(curve.faithfulness[0]) < 1e-5 and abs(curve.faithfulness[-1] - 1) < 1e-5
    # with resample ablation the empty circuit is the corrupted run
    assert abs(curve.m_empty - float(_metric(tiny_model(b.corr_tokens)).mean())) < 1e-4
    x, y = np.array(curve.fractions), np.array(curve.faithfulness)
    manual = float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))
    assert abs(curve.cpr - manual) < 1e-9
    keep, f = smallest_faithful_circuit(
        tiny_model, b, groups, scores, target=0.8, ablation="resample", probes=8
    )
    k = int(keep.sum())
    assert f >= 0.8
    assert torch.equal(keep, top_k_circuit(scores, k))
    # one unit fewer does not reach the target (the search stops at a bracket of width 1)
    ks = torch.stack(
        [
            top_k_circuit(scores, k - 1),
            torch.ones(136, dtype=torch.bool),
            torch.zeros(136, dtype=torch.bool),
        ]
    )
    m = circuit_metrics(tiny_model, b, groups, ks, "resample")
    f_less = float((m[0] - m[2]) / (m[1] - m[2]))
    assert f_less < 0.8


def test_curve_areas():
    cpr, cmd = curve_areas([0, 0.5, 1], [0, 1, 1])
    assert abs(cpr - 0.75) < 1e-12 and abs(cmd - 0.25) < 1e-12
    cpr, cmd = curve_areas([0, 1], [0, 1.5])
    # trapezoid rule on |1 - f| at the points: (1 + 0.5) / 2
    assert abs(cpr - 0.75) < 1e-12 and abs(cmd - 0.75) < 1e-12


def test_statistics_against_scipy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = np.round(rng.normal(size=40), 1)  # rounding creates ties
        y = rng.random(40) < 0.3
        # AUC by brute force over all pairs, ties 1/2
        pos, neg = s[y], s[~y]
        brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
        assert abs(roc_auc(torch.tensor(s), torch.tensor(y)) - brute) < 1e-12
        t = np.round(rng.normal(size=40), 1)
        assert abs(spearman(s, t) - stats.spearmanr(s, t).statistic) < 1e-10
    a = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)
    assert jaccard(a, b) == 0.5
    assert math.isnan(roc_auc(torch.ones(3), torch.ones(3, dtype=torch.bool)))


def test_compare_with_mask():
    scores = torch.tensor([0.9, -0.8, 0.1, 0.05, 0.7, 0.0])
    keep = torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.bool)
    params = torch.tensor([3.0, 2.0, -1.0, -2.0, 0.5, 1.0])
    out = compare_with_mask(scores, keep, params)
    assert out["k"] == 3
    assert out["jaccard"] == pytest.approx(2 / 4)  # top-3 = {0, 1, 4}
    assert out["roc_auc"] == pytest.approx(roc_auc(scores.abs(), keep))
    assert out["spearman"] == pytest.approx(stats.spearmanr(scores.abs(), params).statistic)
    with pytest.raises(ValueError, match="different numbers of units"):
        compare_with_mask(scores, keep[:4])
