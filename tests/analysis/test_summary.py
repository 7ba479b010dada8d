"""Tests of subroutine_circuits.analysis.summary on synthetic experiment folders."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from experiment_fixtures import D_MLP, N_HEADS, N_LAYERS, SUBS, make_experiment, synth_units  # noqa: F401
from scipy.stats import norm

from subroutine_circuits.analysis import summary as stats
from subroutine_circuits.utils import clipped_diff


def test_cluster_bootstrap_matches_explicit_loop():
    """The vectorised bootstrap equals a plain loop that concatenates the drawn clusters' rows."""
    vals = np.array([0.1, 0.2, 0.9, 0.4, 0.5, 0.55, 0.7])
    clus = np.array([0, 0, 1, 2, 2, 2, 3])
    n_boot, seed = 300, 7
    mean, lo, hi = stats.cluster_bootstrap_ci(vals, clus, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 4, size=(n_boot, 4))
    reps = []
    for draw in idx:
        rows = np.concatenate([vals[clus == c] for c in draw])
        reps.append(rows.mean())
    assert mean == pytest.approx(vals.mean())
    assert lo == pytest.approx(np.quantile(reps, 0.025))
    assert hi == pytest.approx(np.quantile(reps, 0.975))


def test_ci_contains_mean_and_shrinks_with_more_clusters():
    """CI brackets the mean, and 40 base models give a narrower CI than 5 of the same spread."""
    rng = np.random.default_rng(0)
    widths = {}
    for k in (5, 40):
        # the same spread of base-model effects in both cases: normal quantiles
        effects = norm.ppf((np.arange(k) + 0.5) / k)
        clus = np.repeat(np.arange(k), 3)
        vals = effects[clus] + rng.normal(0.0, 0.1, size=3 * k)
        mean, lo, hi = stats.cluster_bootstrap_ci(vals, clus, n_boot=2000, seed=1)
        assert lo <= mean <= hi
        assert mean == pytest.approx(vals.mean())
        widths[k] = hi - lo
    assert widths[40] < 0.6 * widths[5]


def test_clustered_ci_wider_than_rowwise_for_identical_rows():
    """Rows within a base model identical: the clustered CI must be wider than the row-wise one."""
    effects = np.array([0.1, 0.5, -0.2, 0.3, 0.0, 0.6])
    clus = np.repeat(np.arange(len(effects)), 5)
    vals = effects[clus]
    _, clo, chi = stats.cluster_bootstrap_ci(vals, clus, n_boot=4000, seed=3)
    _, rlo, rhi = stats.cluster_bootstrap_ci(vals, None, n_boot=4000, seed=3)
    assert (chi - clo) > 1.5 * (rhi - rlo)


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match="n_boot"):
        stats.cluster_bootstrap_ci([1.0], [0], n_boot=0)
    with pytest.raises(ValueError, match="length"):
        stats.cluster_bootstrap_ci([1.0, 2.0], [0])
    assert all(math.isnan(x) for x in stats.cluster_bootstrap_ci([np.nan], [0]))
    # one cluster: mean, but no interval
    m, lo, hi = stats.cluster_bootstrap_ci([0.2, 0.4], [7, 7])
    assert m == pytest.approx(0.3) and math.isnan(lo) and math.isnan(hi)


def test_clip_diff():
    assert clipped_diff(0.9, 0.1) == pytest.approx(0.65)
    assert clipped_diff(0.1, 0.2) == pytest.approx(0.0)
    assert clipped_diff(0.3, 0.8) == pytest.approx(-0.5)


# ----------------------------------------------------------------------------- summaries


def test_summarize_counts_and_exclusion():
    df = make_experiment()
    s = stats.summarize(df, n_boot=200)
    assert len(s) == 3 * 2  # inits x subroutines
    for _, row in s.iterrows():
        g = df[
            (df["init"] == row["init"]) & (df["subroutine"] == row["subroutine"]) & df["base_ok"]
        ]
        assert row["n_runs"] == len(g)
        assert row["n_compositional"] == int(g["compositional"].sum())
        assert row["frac_compositional"] == pytest.approx(g["compositional"].mean())
        assert row["sub_diff_mean"] == pytest.approx(g["sub_diff"].mean())
        assert row["density_mean"] == pytest.approx(g["density"].mean())
        for col in ("sub_diff", "abl_diff", "density"):
            assert row[f"{col}_lo"] <= row[f"{col}_mean"] + 1e-12 <= row[f"{col}_hi"] + 2e-12
    trained = s[s["init"] == "trained"].iloc[0]
    assert trained["n_runs"] == 2 * 3  # base seed 2 excluded: 2 base models x 3 mask seeds
    assert trained["n_excluded_base_models"] == 1
    assert trained["n_excluded_runs"] == 3
    assert s[s["init"] == "random_init"]["n_excluded_base_models"].eq(0).all()


def test_summarize_rejects_missing_columns():
    df = make_experiment().drop(columns=["abl_diff"])
    with pytest.raises(ValueError, match="abl_diff"):
        stats.summarize(df)


def test_verdict_rules():
    base = {"n_runs": 9, "sub_diff_mean": 0.5}
    good = dict(base, sub_diff_lo=0.3, sub_diff_hi=0.6, abl_diff_lo=-0.6, abl_diff_hi=-0.3)
    assert stats.verdict(good) == "compositional"
    weak = dict(good, abl_diff_lo=-0.01, abl_diff_hi=0.02)
    assert stats.verdict(weak) == "not compositional"
    unsure = dict(good, abl_diff_lo=-0.4, abl_diff_hi=0.02)
    assert stats.verdict(unsure) == "inconclusive"
    single = dict(good, sub_diff_lo=np.nan, sub_diff_hi=np.nan)
    assert stats.verdict(single) == "too few base models"


def test_fisher_against_hand_computation():
    """[[8, 1], [1, 8]]: two-sided p = (1 + 81 + 81 + 1) / C(18, 9), odds ratio 64."""
    rows = []
    for init, k in (("trained", 8), ("random_init", 1)):
        for i in range(9):
            rows.append(
                {
                    "task": "t",
                    "model": "tiny",
                    "init": init,
                    "base_seed": i // 3,
                    "mask_seed": i % 3,
                    "subroutine": "a",
                    "base_ok": True,
                    "compositional": i < k,
                    "sub_diff": 0.5,
                    "abl_diff": -0.5,
                }
            )
    res = stats.compare_frequencies(pd.DataFrame(rows), "trained", "random_init")
    assert len(res) == 1
    r = res.iloc[0]
    assert (r["k_a"], r["n_a"], r["k_b"], r["n_b"]) == (8, 9, 1, 9)
    # hypergeometric probabilities of the first cell given margins 9/9 and 9/9
    total = math.comb(18, 9)
    probs = {k: math.comb(9, k) * math.comb(9, 9 - k) / total for k in range(10)}
    p_obs = probs[8]
    p_hand = sum(p for p in probs.values() if p <= p_obs * (1 + 1e-9))
    assert p_hand == pytest.approx(164 / 48620)
    assert r["p_value"] == pytest.approx(p_hand)
    assert r["odds_ratio"] == pytest.approx((8 * 8) / (1 * 1))


def test_frequency_tests_pairs():
    df = make_experiment()
    t = stats.frequency_tests(df)
    pairs = set(zip(t["init_a"], t["init_b"]))
    assert pairs == {
        ("trained", "random_init"),
        ("pretrained", "trained"),
        ("pretrained", "random_init"),
    }
    # trained rows exclude the failed base model
    tr = t[(t["init_a"] == "trained")]
    assert (tr["n_a"] == 6).all()
    with pytest.raises(ValueError, match="two different"):
        stats.compare_frequencies(df, "trained", "trained")


# ----------------------------------------------------------------------------- overlap


def test_mask_overlap_by_hand():
    units = [(0, "head", 0), (0, "head", 1), (0, "neuron", 0), (1, "head", 0), (1, "head", 1)]
    a = torch.tensor([True, True, False, True, False])
    b = torch.tensor([True, False, False, True, True])
    ov = stats.mask_overlap(a, b, units).set_index(["layer", "kind"])
    # layer 0 heads: a={0,1}, b={0} -> shared 1, union 2
    assert ov.loc[(0, "head"), "n_shared"] == 1
    assert ov.loc[(0, "head"), "jaccard"] == pytest.approx(1 / 2)
    # layer 0 neurons: both empty -> Jaccard undefined
    assert math.isnan(ov.loc[(0, "neuron"), "jaccard"])
    # layer 1 heads: a={0}, b={0,1}
    assert ov.loc[(1, "head"), "jaccard"] == pytest.approx(1 / 2)
    # overall: a={0,1,3}, b={0,3,4} -> shared {0,3}, union {0,1,3,4}
    assert ov.loc[(-1, "all"), "n_shared"] == 2
    assert ov.loc[(-1, "all"), "jaccard"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="mask sizes"):
        stats.mask_overlap(a[:3], b, units)


def test_write_summary_and_overlap(tmp_path):
    df = make_experiment(tmp_path, inits=("trained", "random_init"), n_base=3, n_mask=2)
    path = stats.write_summary(tmp_path, n_boot=200)
    assert path == tmp_path / "summary.csv"
    summary = pd.read_csv(path)
    assert set(summary["kind"]) == {"group", "test"}
    assert (summary["kind"] == "group").sum() == 4
    assert (summary["kind"] == "test").sum() == 2  # trained vs random_init, per subroutine
    assert summary.loc[summary["kind"] == "group", "verdict"].notna().all()

    overlap = pd.read_csv(tmp_path / "overlap.csv")
    n_runs = 2 * 3 * 2  # inits x base x mask seeds
    n_groups = N_LAYERS * 2 + 1  # (layer, kind) groups + overall row
    assert len(overlap) == n_runs * n_groups
    # check one overall Jaccard against the mask files directly
    row = overlap[(overlap["kind"] == "all")].iloc[0]
    sel = df[
        (df["init"] == row["init"])
        & (df["base_seed"] == row["base_seed"])
        & (df["mask_seed"] == row["mask_seed"])
    ].sort_values("subroutine")
    fa, fb = (torch.load(tmp_path / p)["flat"].numpy() for p in sel["mask_path"])
    assert row["jaccard"] == pytest.approx((fa & fb).sum() / (fa | fb).sum())

    freq = stats.kept_frequency(tmp_path)
    assert set(freq["init"]) == {"trained", "random_init"}
    cell = freq[(freq["init"] == "trained") & (freq["subroutine"] == SUBS[0])]
    ok = df[(df["init"] == "trained") & (df["subroutine"] == SUBS[0]) & df["base_ok"]]
    flats = np.stack([torch.load(tmp_path / p)["flat"].numpy() for p in ok["mask_path"]])
    assert np.allclose(cell["freq"].to_numpy(), flats.mean(axis=0))
    assert (cell["n_masks"] == len(ok)).all()


def test_overlap_table_skips_missing_masks(tmp_path):
    make_experiment(tmp_path, inits=("trained",), n_base=1, n_mask=2)
    for p in (tmp_path / "masks").glob("*m1.pt"):
        p.unlink()
    ov = stats.overlap_table(tmp_path)
    assert set(ov["mask_seed"]) == {0}


def test_load_results_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        stats.load_results(tmp_path)
