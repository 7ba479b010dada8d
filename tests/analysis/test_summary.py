"""Tests of subroutine_circuits.analysis.summary on synthetic experiment folders."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from experiment_fixtures import D_MLP, N_HEADS, N_LAYERS, SUBS, make_experiment, synth_units  # noqa: F401

from subroutine_circuits.analysis import summary as stats


def _by_hand(df: pd.DataFrame, margin: float = 0.05) -> dict:
    """Per cell: base-model fractions and flags, computed with plain loops from the rules."""
    out: dict = {}
    for (init, sub), g in df.groupby(["init", "subroutine"]):
        fracs, mostly, subm, ablm = [], [], [], []
        for _, b in g.groupby("base_seed"):
            u = b[b["base_ok"] & b["mask_ok"]]
            if u.empty:
                continue
            comp = (u["sub_diff"] > margin) & (u["abl_diff"] < -margin) & (u["randabl_p"] <= 0.05)
            fracs.append(comp.mean())
            mostly.append(2 * comp.sum() > len(u))
            subm.append(u["sub_diff"].mean())
            ablm.append(u["abl_diff"].mean())
        out[(init, sub)] = {"fracs": fracs, "k": sum(mostly), "sub": subm, "abl": ablm}
    return out


def _perm_p(a: list, b: list) -> float:
    """Exact two-sided permutation p of mean(a) - mean(b) by enumerating every relabelling."""
    pooled = np.array(a + b, dtype=float)
    obs = abs(np.mean(a) - np.mean(b))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        mask = np.zeros(len(pooled), dtype=bool)
        mask[list(idx)] = True
        d = abs(pooled[mask].mean() - pooled[~mask].mean())
        hits += d >= obs - 1e-12
        total += 1
    return hits / total


def test_summary_frame_against_hand_computation(tmp_path):
    from scipy.stats import t as t_dist
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.proportion import proportion_confint

    df = make_experiment(tmp_path, n_base=3, n_mask=3)
    s = stats.summary_frame(tmp_path).set_index(["init", "subroutine"])
    assert len(s) == 3 * 2
    hand = _by_hand(df)
    for (init, sub), h in hand.items():
        row = s.loc[(init, sub)]
        n = len(h["fracs"])
        assert row["n_base_models"] == n
        assert row["base_models_compositional"] == h["k"]
        lo, hi = proportion_confint(h["k"], n, alpha=0.05, method="beta")
        assert row["base_models_compositional_lo"] == pytest.approx(lo, abs=1e-9)
        assert row["base_models_compositional_hi"] == pytest.approx(hi, abs=1e-9)
        lo, hi = t_dist.interval(0.95, n - 1, loc=np.mean(h["sub"]), scale=stats_sem(h["sub"]))
        assert row["sub_diff_mean"] == pytest.approx(np.mean(h["sub"]))
        assert (row["sub_diff_lo"], row["sub_diff_hi"]) == pytest.approx((lo, hi))
    # trained: base seed 2 failed the composite task; pretrained: one failed mask search
    assert s.loc[("trained", SUBS[0]), "base_models_excluded"] == 1
    assert s.loc[("trained", SUBS[0]), "runs_excluded"] == 3
    assert s.loc[("pretrained", SUBS[0]), "runs_failed"] == 1
    assert s.loc[("pretrained", SUBS[1]), "runs_failed"] == 0
    # tests: exact permutation over base models, Holm over the 4 tests of the experiment
    tested = [(i, c, sub) for i, c in (("trained", "random_init"), ("pretrained", "trained"))
              for sub in SUBS]  # fmt: skip
    ps = [_perm_p(hand[(i, sub)]["fracs"], hand[(c, sub)]["fracs"]) for i, c, sub in tested]
    holm = multipletests(ps, method="holm")[1]
    for (init, control, sub), p, ph in zip(tested, ps, holm):
        row = s.loc[(init, sub)]
        assert row["control_init"] == control
        assert row["p_value"] == pytest.approx(p)
        assert row["p_holm"] == pytest.approx(ph)
    assert math.isnan(s.loc[("random_init", SUBS[0]), "p_value"])
    # per-kind densities from the mask files themselves
    units = synth_units()
    kinds = np.array([u[1] for u in units])
    for (init, sub), row in s.iterrows():
        g = df[(df["init"] == init) & (df["subroutine"] == sub) & df["base_ok"] & df["mask_ok"]]
        flats = np.stack([torch.load(tmp_path / p)["flat"].numpy() for p in g["mask_path"]])
        for kind in ("head", "neuron"):
            assert row[f"density_{kind}"] == pytest.approx(flats[:, kinds == kind].mean())
        assert row["density_mean"] == pytest.approx(g["density"].mean())


def stats_sem(values: list) -> float:
    """Standard error of the mean (sample sd / sqrt(n))."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / math.sqrt(v.size))


def test_summary_of_legacy_results_degrades(tmp_path):
    """Results without randabl_p / mask_ok: no crash, no run called compositional, counts say
    why: runs that pass the margins have no random control, runs that fail one are decided
    (not compositional), and the paper's criterion counts the margins alone."""
    df = make_experiment(
        tmp_path, inits=("trained", "random_init"), n_base=2, n_mask=2, legacy=True
    )
    path = stats.write_summary(tmp_path)
    s = pd.read_csv(path).set_index(["init", "subroutine"])
    assert (s["base_models_compositional"] == 0).all() and (s["runs_compositional"] == 0).all()
    for (init, sub), g in df.groupby(["init", "subroutine"]):
        ok = g[g["base_ok"]]
        margins = (ok["sub_diff"] > 0.05) & (ok["abl_diff"] < -0.05)
        row = s.loc[(init, sub)]
        assert row["runs_no_control"] == margins.sum()
        assert row["runs_usable"] == (~margins).sum()
        assert row["n_base_models"] == ok.loc[~margins, "base_seed"].nunique()
        assert row["paper_runs_usable"] == len(ok)
        assert row["paper_runs_compositional"] == margins.sum()
        share = margins.groupby(ok["base_seed"]).mean()
        assert row["paper_base_models_compositional"] == (share > 0.5).sum()


def test_summary_rejects_missing_columns(tmp_path):
    df = make_experiment().drop(columns=["abl_diff"])
    with pytest.raises(ValueError, match="abl_diff"):
        stats.summary_frame(tmp_path, df)


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
    path = stats.write_summary(tmp_path)
    assert path == tmp_path / "summary.csv"
    summary = pd.read_csv(path)
    assert len(summary) == 4  # one row per cell; no test rows stacked in
    for col in ("n_base_models", "base_models_compositional", "p_value", "p_holm"):
        assert col in summary.columns
    assert summary["p_value"].notna().sum() == 2  # trained vs random_init, per subroutine
    assert not (tmp_path / "agreement.csv").exists()  # no patching score files

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
