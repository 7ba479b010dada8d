"""Tests of analysis/inference.py: every number against an independent computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from subroutine_circuits.analysis import inference as inf

# ----------------------------------------------------------------------------- fixtures


def _run(init, base_seed, mask_seed, comp, sub="subject", **kw):
    """One results row; ``comp`` True gives a clearly compositional run, False a clear negative."""
    row = {
        "task": "sva",
        "model": "tiny",
        "init": init,
        "subroutine": sub,
        "base_seed": base_seed,
        "mask_seed": mask_seed,
        "base_ok": True,
        "bypass": False,
        "mask_ok": True,
        "sub_diff": 0.4 if comp else 0.0,
        "abl_diff": -0.4 if comp else 0.0,
        "randabl_p": 0.01 if comp else 0.5,
    }
    row.update(kw)
    return row


def _design(frac_by_init: dict[str, list[list[bool]]], sub="subject") -> pd.DataFrame:
    """Results from ``{init: [[run verdicts of base model 0], [.. base model 1], ...]}``."""
    rows = []
    for init, bases in frac_by_init.items():
        for b, runs in enumerate(bases):
            for m, c in enumerate(runs):
                rows.append(_run(init, b, m, c, sub=sub))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- 1. run verdicts


def test_randabl_p_hand_values_and_validity():
    # 2 of 4 draws at most the learned value (one tie) -> (1 + 2) / (1 + 4)
    assert inf.randabl_p(-0.5, [-0.6, -0.4, -0.5, 0.0]) == pytest.approx(3 / 5)
    # learned below every draw: the smallest attainable p is 1 / (n + 1)
    assert inf.randabl_p(-1.0, np.zeros(20)) == pytest.approx(1 / 21)
    assert inf.randabl_p(-1.0, np.zeros(20)) < 0.05 <= inf.randabl_p(-1.0, np.zeros(19))
    # under the null (learned exchangeable with the draws) P(p <= 0.05) <= 0.05
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(4000, 21))
    ps = np.array([inf.randabl_p(v[0], v[1:]) for v in vals])
    assert np.mean(ps <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)
    with pytest.raises(ValueError, match="at least one"):
        inf.randabl_p(0.0, [])
    with pytest.raises(ValueError, match="NaN"):
        inf.randabl_p(0.0, [0.1, float("nan")])


def test_run_verdict_branches_and_precedence():
    good = _run("trained", 0, 0, True)
    assert inf.run_verdict(good, 0.05) == "compositional"
    assert inf.run_verdict({**good, "base_ok": False, "mask_ok": False}) == "excluded"
    assert inf.run_verdict({**good, "bypass": "True"}) == "excluded"
    assert inf.run_verdict({**good, "mask_ok": "False"}) == "search failed"
    # each condition alone blocks the verdict; the margins are strict, alpha is included
    # (randabl_p takes the values k / (n + 1): 5 / 100 = 0.05 passes alpha = 0.05)
    assert inf.run_verdict({**good, "sub_diff": 0.05}, 0.05) == "not compositional"
    assert inf.run_verdict({**good, "abl_diff": -0.05}, 0.05) == "not compositional"
    assert inf.run_verdict({**good, "randabl_p": 0.05}, 0.05) == "compositional"
    assert inf.run_verdict({**good, "randabl_p": 0.0501}, 0.05) == "not compositional"
    assert inf.run_verdict({**good, "randabl_p": 0.049}, 0.05) == "compositional"
    # absent optional flags take their defaults; a Series works like a dict
    minimal = {k: good[k] for k in ("sub_diff", "abl_diff", "randabl_p")}
    assert inf.run_verdict(pd.Series(minimal)) == "compositional"
    # no matched random control on a run that passes the margins: neither compositional nor
    # not, and never an error; a run that fails a margin is not compositional without one
    assert inf.run_verdict({**good, "randabl_p": float("nan")}) == "no random control"
    assert inf.run_verdict({k: good[k] for k in ("sub_diff", "abl_diff")}) == "no random control"
    bad = _run("trained", 0, 0, False)
    assert inf.run_verdict({**bad, "randabl_p": float("nan")}) == "not compositional"
    assert inf.run_verdict({k: bad[k] for k in ("sub_diff", "abl_diff")}) == "not compositional"
    # an empty flag cell (NaN) takes the flag's default
    assert inf.run_verdict({**good, "bypass": float("nan")}) == "compositional"
    with pytest.raises(ValueError, match="sub_diff"):
        inf.run_verdict({**good, "sub_diff": float("nan")})
    with pytest.raises(ValueError, match="mask_ok"):
        inf.run_verdict({**good, "mask_ok": "maybe"})
    # a failed search with NaN measurements is still a failed search, not an error
    assert inf.run_verdict({**good, "mask_ok": False, "sub_diff": float("nan")}) == "search failed"


def test_validate_runs_names_missing_columns():
    with pytest.raises(ValueError, match="abl_diff"):
        inf.run_verdicts(pd.DataFrame([_run("trained", 0, 0, True)]).drop(columns="abl_diff"))
    # old results without the matched random control: every run that passes the margins is
    # "no random control", one that fails a margin is decided (not compositional)
    old = pd.DataFrame([_run("trained", 0, m, True) for m in range(3)]).drop(columns="randabl_p")
    v = inf.run_verdicts(old)
    assert (v["verdict"] == "no random control").all() and not v["usable"].any()
    assert v["paper_usable"].all() and v["paper_compositional"].all()
    cells = inf.summary_table(old)
    assert cells.loc[0, "n_base_models"] == 0 and cells.loc[0, "runs_no_control"] == 3
    assert math.isnan(cells.loc[0, "base_models_compositional_frac"])
    assert cells.loc[0, "paper_base_models_compositional"] == 1
    assert cells.loc[0, "paper_runs_compositional"] == cells.loc[0, "paper_runs_usable"] == 3
    mixed = pd.DataFrame([_run("trained", 0, 0, True), _run("trained", 0, 1, False)])
    v = inf.run_verdicts(mixed.drop(columns="randabl_p"))
    assert v["verdict"].tolist() == ["no random control", "not compositional"]
    assert v["usable"].tolist() == [False, True]
    with pytest.raises(ValueError, match="no rows"):
        inf.run_verdicts(pd.DataFrame(columns=list(inf.REQUIRED_COLUMNS)))
    with pytest.raises(ValueError, match="DataFrame"):
        inf.base_model_table([1, 2])


# ----------------------------------------------------------------------------- 2. intervals


@pytest.mark.parametrize("k,n", [(0, 5), (1, 5), (3, 5), (5, 5), (0, 1), (7, 20), (2, 3)])
def test_clopper_pearson_matches_scipy_binomtest(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = inf.clopper_pearson(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-10)
    assert hi == pytest.approx(ci.high, abs=1e-10)


def test_clopper_pearson_edge_cases():
    assert all(math.isnan(v) for v in inf.clopper_pearson(0, 0))
    with pytest.raises(ValueError):
        inf.clopper_pearson(4, 3)


def test_t_interval_matches_scipy_and_covers():
    v = np.array([0.1, 0.5, 0.3, 0.2])
    m, lo, hi = inf.t_interval(v)
    ref = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert (m, lo, hi) == pytest.approx((v.mean(), *ref))
    m1, lo1, hi1 = inf.t_interval([0.3, float("nan")])
    assert m1 == 0.3 and math.isnan(lo1) and math.isnan(hi1)
    # simulated coverage with 3 base models (the min-max "interval" covers about 0.75)
    rng = np.random.default_rng(1)
    draws = rng.normal(0.2, 0.3, size=(4000, 3))
    cover = [lo <= 0.2 <= hi for _, lo, hi in (inf.t_interval(d) for d in draws)]
    assert abs(np.mean(cover) - 0.95) < 3 * math.sqrt(0.95 * 0.05 / 4000) + 0.002
    minmax = np.mean((draws.min(1) <= 0.2) & (draws.max(1) >= 0.2))
    assert minmax == pytest.approx(0.75, abs=0.03)


# ----------------------------------------------------------------------------- 2. tables


def _mixed_results():
    """trained: base 0 = 2/3 compositional, base 1 = 1/2 (+1 failed), base 2 excluded."""
    rows = [
        _run("trained", 0, 0, True, sub_diff=0.3, abl_diff=-0.2),
        _run("trained", 0, 1, True, sub_diff=0.5, abl_diff=-0.6),
        _run("trained", 0, 2, False, sub_diff=0.1, abl_diff=0.0),
        _run("trained", 1, 0, True, sub_diff=0.2, abl_diff=-0.3),
        _run("trained", 1, 1, False, sub_diff=0.0, abl_diff=0.1),
        _run("trained", 1, 2, True, mask_ok=False, sub_diff=float("nan")),
        _run("trained", 2, 0, True, base_ok=False),
        _run("trained", 2, 1, True, base_ok=False),
        _run("random_init", 0, 0, False, sub_diff=0.01, abl_diff=0.02),
    ]
    return pd.DataFrame(rows)


def test_base_model_table_counts():
    bm = inf.base_model_table(_mixed_results()).set_index(["init", "base_seed"])
    b0, b1, b2 = bm.loc[("trained", 0)], bm.loc[("trained", 1)], bm.loc[("trained", 2)]
    assert (b0.n_usable, b0.n_compositional, b0.mostly_compositional) == (3, 2, True)
    assert b0.sub_diff_mean == pytest.approx(0.3) and b0.abl_diff_mean == pytest.approx(-0.8 / 3)
    # exactly half is not "mostly"; the failed run is neither usable nor compositional
    assert (b1.n_usable, b1.n_failed, b1.n_compositional) == (2, 1, 1)
    assert not b1.mostly_compositional and b1.frac_compositional == 0.5
    assert (b2.n_excluded, b2.n_usable, b2.has_usable) == (2, 0, False)
    assert math.isnan(b2.frac_compositional)


def test_summarize_cells_against_hand_computation():
    cells = inf.summarize_cells(_mixed_results()).set_index("init")
    tr = cells.loc["trained"]
    assert (tr.n_base_models, tr.n_base_models_unusable, tr.base_models_compositional) == (2, 1, 1)
    ci = stats.binomtest(1, 2).proportion_ci(method="exact")
    assert (tr.base_models_compositional_lo, tr.base_models_compositional_hi) == pytest.approx(
        (ci.low, ci.high)
    )
    base_sub = np.array([0.3, 0.1])  # base-model means of sub_diff over usable runs
    ref = stats.t.interval(0.95, 1, loc=base_sub.mean(), scale=stats.sem(base_sub))
    assert (tr.sub_diff_mean, tr.sub_diff_lo, tr.sub_diff_hi) == pytest.approx((0.2, *ref))
    assert (tr.runs_total, tr.runs_usable, tr.runs_failed, tr.runs_excluded) == (8, 5, 1, 2)
    assert tr.runs_compositional == 3
    ri = cells.loc["random_init"]
    assert ri.n_base_models == 1 and ri.base_models_compositional == 0
    assert ri.sub_diff_mean == pytest.approx(0.01) and math.isnan(ri.sub_diff_lo)


# ----------------------------------------------------------------------------- 3. tests


def _brute_force_perm_p(a, b, alternative):
    """p over all n! orderings of the pooled values (each split counted na! nb! times)."""
    pooled = np.concatenate([a, b]).astype(float)
    na = len(a)
    obs = np.mean(a) - np.mean(b)
    hits = total = 0
    for perm in itertools.permutations(pooled):
        d = np.mean(perm[:na]) - np.mean(perm[na:])
        if alternative == "two-sided":
            hits += abs(d) >= abs(obs) - 1e-12
        elif alternative == "greater":
            hits += d >= obs - 1e-12
        else:
            hits += d <= obs + 1e-12
        total += 1
    return hits / total


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_exact_matches_brute_force(alternative):
    a = np.array([1.0, 2 / 3, 1.0, 0.5])
    b = np.array([0.0, 1 / 3, 0.5])
    diff, p, method, n_rel = inf.permutation_test(a, b, alternative)
    assert method == "exact" and n_rel == math.comb(7, 4)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert p == pytest.approx(_brute_force_perm_p(a, b, alternative))
    # Monte Carlo agrees with the exact value
    _, p_mc, method_mc, _ = inf.permutation_test(a, b, alternative, max_exact=0, n_perm=20000)
    assert method_mc == "monte carlo"
    assert p_mc == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 20000) + 1e-4)


def test_clustered_design_three_vs_three():
    """3 vs 3 base models x 3 mask seeds, all compositional vs none.

    Exactly one of the C(6,3) = 20 relabelings puts the three compositional base models in the
    trained group: one-sided p = 1/20 = 0.05; its mirror image is as extreme in the other
    direction: two-sided p = 2/20 = 0.10. Counting the 18 runs as independent (Fisher, 9/9 vs
    0/9) would give about 4e-5.
    """
    res = _design({"trained": [[True] * 3] * 3, "random_init": [[False] * 3] * 3})
    two = inf.cell_tests(res)
    assert len(two) == 1
    row = two.iloc[0]
    assert row.p_value == pytest.approx(0.10)
    assert row.test == "permutation exact (20 relabelings)"
    assert (row.base_models_compositional, row.base_models_compositional_control) == (3, 0)
    one = inf.cell_tests(res, alternative="greater").iloc[0]
    assert one.p_value == pytest.approx(0.05)
    assert stats.fisher_exact([[9, 0], [0, 9]]).pvalue < 1e-4  # what the old test claimed
    # GEE is not estimable here, and says why
    assert math.isnan(row.gee_p) and "too few clusters" in row.gee_note


def test_holm_against_hand_computation_and_statsmodels():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    expected = np.array([0.03, 0.06, 0.06, 0.02, np.nan])
    np.testing.assert_allclose(inf.holm(p), expected, equal_nan=True)
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(3)
    q = rng.uniform(0, 0.2, size=12)
    np.testing.assert_allclose(inf.holm(q), multipletests(q, method="holm")[1])
    with pytest.raises(ValueError):
        inf.holm([1.5])


def test_cell_tests_family_and_summary_table():
    # two subroutines x two comparisons -> a family of 4 tests
    parts = []
    for sub in ("subject", "verb"):
        parts.append(
            _design(
                {
                    "pretrained": [[True, True, False]] * 2 + [[False, False, True]],
                    "trained": [[True] * 3] * 3 + [[True, False, True]],
                    "random_init": [[False] * 3] * 4,
                },
                sub=sub,
            )
        )
    res = pd.concat(parts, ignore_index=True)
    tests = inf.cell_tests(res)
    assert len(tests) == 4
    np.testing.assert_allclose(tests["p_holm"], inf.holm(tests["p_value"].to_numpy()))
    tr = tests[(tests.init == "trained") & (tests.subroutine == "subject")].iloc[0]
    # trained fracs [1,1,1,2/3] vs [0,0,0,0]: only the observed split is as extreme each way
    assert tr.p_value == pytest.approx(2 / math.comb(8, 4))
    table = inf.summary_table(res).set_index(["subroutine", "init"])
    assert {"n_base_models", "base_models_compositional", "p_value", "p_holm"} <= set(table.columns)
    assert table.loc[("subject", "trained"), "control_init"] == "random_init"
    assert table.loc[("subject", "pretrained"), "control_init"] == "trained"
    assert table.loc[("verb", "trained"), "p_holm"] == pytest.approx(
        tests.set_index(["subroutine", "init"]).loc[("verb", "trained"), "p_holm"]
    )
    assert math.isnan(table.loc[("subject", "random_init"), "p_value"])
    assert table.loc[("subject", "random_init"), "test"] == ""
    assert table.loc[("subject", "pretrained"), "base_models_compositional"] == 2
    with pytest.raises(ValueError, match="one control"):
        inf.summary_table(res, comparisons=[("trained", "random_init"), ("trained", "x")])


def test_gee_matches_hand_computed_estimate_and_sandwich():
    """Equal cluster sizes and a cluster-level covariate: the exchangeable GEE estimate equals the
    difference of pooled log odds and its robust variance the cluster sandwich of that."""
    rng = np.random.default_rng(5)
    n_c, m = 6, 4  # clusters per group, runs per cluster
    y_a = rng.random((n_c, m)) < 0.7
    y_b = rng.random((n_c, m)) < 0.3
    y_a[0, 0], y_a[1, 0], y_b[0, 0], y_b[1, 0] = True, False, True, False  # no separation
    y = np.concatenate([y_a.ravel(), y_b.ravel()]).astype(float)
    x = np.repeat([1.0, 0.0], n_c * m)
    groups = np.repeat(np.arange(2 * n_c), m)
    out = inf.gee_logistic(y, x, groups)
    assert out["note"] == ""
    pa, pb = y_a.mean(), y_b.mean()
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert out["log_odds"] == pytest.approx(logit(pa) - logit(pb), abs=1e-6)

    def var_logit(yg, p):  # sandwich for the log odds of one group: sum r_i^2 / (N p(1-p))^2
        r = (yg - p).sum(axis=1)
        return (r**2).sum() / (yg.size * p * (1 - p)) ** 2

    se = math.sqrt(var_logit(y_a, pa) + var_logit(y_b, pb))
    assert out["se"] == pytest.approx(se, rel=1e-4)
    assert out["p_value"] == pytest.approx(2 * stats.norm.sf(abs(out["log_odds"]) / se), rel=1e-3)
    # separation is reported, not fitted
    sep = inf.gee_logistic(np.r_[np.ones(n_c * m), y_b.ravel()], x, groups)
    assert math.isnan(sep["p_value"]) and "separation" in sep["note"]
    with pytest.raises(ValueError, match="nested"):
        inf.gee_logistic([0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1])


# ----------------------------------------------------------------------------- 4. agreement


@pytest.mark.parametrize("n,k_a,k_b", [(30, 5, 5), (12, 3, 7), (10, 10, 4)])
def test_expected_jaccard_against_simulation(n, k_a, k_b):
    rng = np.random.default_rng(7)
    fixed = np.zeros(n, dtype=bool)
    fixed[:k_a] = True
    sims = []
    for _ in range(20000):
        r = np.zeros(n, dtype=bool)
        r[rng.choice(n, k_b, replace=False)] = True
        sims.append((fixed & r).sum() / (fixed | r).sum())
    sims = np.array(sims)
    assert inf.expected_jaccard(n, k_a, k_b) == pytest.approx(
        sims.mean(), abs=4 * sims.std() / math.sqrt(len(sims)) + 1e-9
    )
    assert math.isnan(inf.expected_jaccard(5, 0, 0))


def test_matched_jaccard_and_its_p_against_simulation():
    rng = np.random.default_rng(8)
    n, k = 20, 4
    kept = np.zeros(n, dtype=bool)
    kept[[0, 3, 7, 11]] = True
    scores = np.arange(n, 0, -1).astype(float)  # top-4 = units 0..3 -> overlap 2
    k_, j, ej, p = inf.matched_jaccard(kept, scores)
    assert (k_, j) == (4, pytest.approx(2 / 6))
    overlaps = np.array([kept[rng.choice(n, k, replace=False)].sum() for _ in range(20000)])
    assert p == pytest.approx(np.mean(overlaps >= 2), abs=0.01)
    assert ej == pytest.approx(np.mean(overlaps / (2 * k - overlaps)), abs=0.005)


def test_auc_against_pairs_and_exact_enumeration():
    scores = np.array([0.9, 0.1, 0.8, 0.35, 0.7, 0.2, 0.05, 0.6, 0.3])
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    auc, p_greater = inf.auc_mannwhitney(scores, labels, "greater")
    pos, neg = scores[labels], scores[~labels]
    pairs = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert auc == pytest.approx(pairs)
    # exact null: every set of 4 units is equally likely to be the positives
    aucs = []
    for c in itertools.combinations(range(len(scores)), int(labels.sum())):
        lab = np.zeros(len(scores), dtype=bool)
        lab[list(c)] = True
        aucs.append(np.mean([(a > b) for a in scores[lab] for b in scores[~lab]]))
    aucs = np.array(aucs)
    assert p_greater == pytest.approx(np.mean(aucs >= auc - 1e-12))
    _, p_two = inf.auc_mannwhitney(scores, labels)
    assert p_two == pytest.approx(
        min(1.0, 2 * min(np.mean(aucs >= auc - 1e-12), np.mean(aucs <= auc + 1e-12)))
    )
    assert all(math.isnan(v) for v in inf.auc_mannwhitney([1.0, 2.0], [True, True]))


def test_spearman_exact_p_against_brute_force_and_scipy():
    a = np.array([0.3, 1.2, 0.5, 0.5, 2.0, 0.1])
    b = np.array([1.0, 3.0, 2.0, 0.0, 5.0, 1.0])
    rho, p = inf.spearman_permutation(a, b)
    assert rho == pytest.approx(stats.spearmanr(a, b).statistic)
    perms = itertools.permutations(range(6))
    null = [stats.spearmanr(a, b[list(perm)]).statistic for perm in perms]
    assert p == pytest.approx(np.mean(np.abs(null) >= abs(rho) - 1e-12))
    # Monte Carlo path agrees within its error
    _, p_mc = inf.spearman_permutation(a, b, n_perm=20000, max_exact=0)
    assert p_mc == pytest.approx(p, abs=0.015)
    assert all(math.isnan(v) for v in inf.spearman_permutation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_agreement_table_per_kind_rows_and_baseline():
    """Planted: heads kept are those with top scores, but neuron scores are 400x larger, so the
    pooled AUC says little while the per-kind AUC of heads is 1."""
    rng = np.random.default_rng(9)
    layers = [0] * 4 + [0] * 16 + [1] * 4 + [1] * 16
    kinds = (["head"] * 4 + ["neuron"] * 16) * 2
    n = len(kinds)
    scores = np.where(np.array(kinds) == "head", 1.0, 400.0) * rng.random(n)
    kept = np.zeros(n, dtype=bool)
    head_idx = np.flatnonzero(np.array(kinds) == "head")
    kept[head_idx[np.argsort(-scores[head_idx])[:3]]] = True  # top-3 heads by score
    neuron_idx = np.flatnonzero(np.array(kinds) == "neuron")
    kept[rng.choice(neuron_idx, 5, replace=False)] = True
    tab = inf.agreement_table(kept, scores, layers, kinds, n_perm=500)
    assert list(tab.scope.unique()) == ["pooled", "kind", "kind_layer"]
    assert len(tab) == 1 + 2 + 4
    heads = tab[(tab.scope == "kind") & (tab.kind == "head")].iloc[0]
    assert (heads.n_units, heads.k, heads.auc, heads.jaccard) == (8, 3, 1.0, 1.0)
    assert heads.expected_jaccard == pytest.approx(inf.expected_jaccard(8, 3, 3))
    assert heads.auc_p == pytest.approx(
        stats.mannwhitneyu(
            scores[kept & (np.array(kinds) == "head")], scores[~kept & (np.array(kinds) == "head")]
        ).pvalue
    )
    assert heads.spearman == pytest.approx(
        stats.spearmanr(scores[head_idx], kept[head_idx].astype(float)).statistic
    )
    # baseline: forward order (earlier layer first) -> AUC of -layer for kept heads
    lay_h = -np.array(layers)[head_idx].astype(float)
    pos, neg = lay_h[kept[head_idx]], lay_h[~kept[head_idx]]
    ref = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert heads.baseline_auc == pytest.approx(ref)
    kl = tab[tab.scope == "kind_layer"]
    assert kl.baseline_auc.isna().all() and (kl.layer >= 0).all()
    with pytest.raises(ValueError, match="scores has"):
        inf.agreement_table(kept, scores[:-1], layers, kinds)


# ----------------------------------------------------------------------------- 5. bootstrap


def test_problem_bootstrap_se_matches_binomial():
    rng = np.random.default_rng(11)
    t = rng.random(500) < 0.8
    o = rng.random(400) < 0.6
    out = inf.problem_bootstrap(t, o, n_boot=20000)
    assert out["diff"] == pytest.approx(t.mean() - o.mean())
    se = math.sqrt(t.mean() * (1 - t.mean()) / 500 + o.mean() * (1 - o.mean()) / 400)
    assert out["se"] == pytest.approx(se, rel=0.03)
    assert out["lo"] < out["diff"] < out["hi"]
    assert out["p_le_margin"] < 0.001
    clipped = inf.problem_bootstrap(np.zeros(50, bool), np.zeros(50, bool))
    assert clipped["diff"] == 0.0 and clipped["se"] == 0.0
