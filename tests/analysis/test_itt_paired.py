"""Issue 22: the residual-path verdict, mask_ok on held-out problems, the intention-to-treat
reading and the paired one-sided base-model tests, each against a hand computation."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from subroutine_circuits.analysis import inference as inf
from subroutine_circuits.experiment.config import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _row(init: str, seed: int, mask_seed: int, kind: str, sub: str = "subject") -> dict:
    """A results row of one run whose verdict is ``kind``."""
    row = {
        "task": "sva", "model": "tiny", "init": init, "subroutine": sub, "base_seed": seed,
        "mask_seed": mask_seed, "base_ok": True, "bypass": False, "mask_ok": True,
        "residual_path": False, "sub_diff": 0.4, "abl_diff": -0.4, "randabl_p": 0.01,
    }  # fmt: skip
    if kind == "not":
        row["randabl_p"] = 0.5
    elif kind == "failed":
        row["mask_ok"] = False
    elif kind == "excluded":
        row["base_ok"] = False
    elif kind == "residual":
        row.update(residual_path=True, abl_diff=0.0)
    else:
        assert kind == "comp"
    return row


# ----------------------------------------------------------------------------- residual path


def test_residual_path_is_its_own_verdict_and_leaves_our_counts():
    runs = pd.DataFrame([_row("trained", 0, 0, "comp"), _row("trained", 0, 1, "residual")])
    v = inf.run_verdicts(runs)
    assert v["verdict"].tolist() == ["compositional", "residual path"]
    assert v["usable"].tolist() == [True, False]
    # the paper's criterion has no such rule: the residual run counts there (and fails margins)
    assert v["paper_usable"].tolist() == [True, True]
    cell = inf.summarize_cells(runs).iloc[0]
    assert (cell["runs_residual"], cell["runs_usable"], cell["runs_compositional"]) == (1, 1, 1)
    assert cell["base_models_compositional"] == 1  # 1 of 1 usable: the residual run is out
    assert (cell["paper_runs_usable"], cell["paper_runs_compositional"]) == (2, 1)


def test_failed_search_outranks_residual_path():
    row = _row("trained", 0, 0, "residual")
    row["mask_ok"] = False
    assert inf.run_verdict(row) == "search failed"


@pytest.mark.parametrize("n_kept,min_units,expect", [
    (0, 1, True), (1, 1, False), (2, 3, True), (3, 3, False), (float("nan"), 1, False),
    (None, 1, False),
])  # fmt: skip
def test_is_residual_path(n_kept, min_units, expect):
    assert inf.is_residual_path(n_kept, min_units) is expect


def test_mask_flags_need_held_out_accuracy_and_mark_empty_masks():
    from subroutine_circuits.experiment.verdicts import mask_flags

    cfg = SimpleNamespace(mask_min_acc=0.9, min_mask_units=1)
    assert mask_flags(0.95, 0.93, 5, cfg) == {
        "mask_ok": True, "mask_val_ok": True, "mask_test_ok": True, "residual_path": False,
    }  # fmt: skip
    # fitted to its validation problems, fails on the test sub_<p> problems: search failed
    f = mask_flags(0.95, 0.80, 5, cfg)
    assert (f["mask_ok"], f["mask_val_ok"], f["mask_test_ok"]) == (False, True, False)
    assert mask_flags(0.95, 0.95, 0, cfg)["residual_path"] is True
    assert mask_flags(0.5, 0.95, 0, cfg)["residual_path"] is False  # a failed search stays one
    assert mask_flags(0.95, None, 3, cfg)["mask_ok"] is False


def test_min_mask_units_is_a_checked_config_key():
    from subroutine_circuits.experiment.config import config_from_dict

    assert config_from_dict({"min_mask_units": 3}).min_mask_units == 3
    with pytest.raises(ValueError, match="min_mask_units"):
        config_from_dict({"min_mask_units": 0}).validate()


# ----------------------------------------------------------------------------- ITT


def test_intention_to_treat_counts_every_run():
    runs = pd.DataFrame([
        _row("trained", 0, 0, "comp"), _row("trained", 0, 1, "failed"),  # 1 of 1 / 1 of 2
        _row("trained", 1, 0, "comp"), _row("trained", 1, 1, "comp"),  # 2 of 2
        _row("random_init", 0, 0, "excluded"), _row("random_init", 0, 1, "excluded"),
    ])  # fmt: skip
    cells = inf.summarize_cells(runs).set_index("init")
    t = cells.loc["trained"]
    assert (t["base_models_compositional"], t["n_base_models"]) == (2, 2)
    # ITT: base model 0 has 1 of 2 runs compositional -> not more than half
    assert (t["itt_base_models_compositional"], t["itt_n_base_models"]) == (1, 2)
    assert t["itt_runs_compositional"] == 3 and t["runs_total"] == 4
    r = cells.loc["random_init"]
    assert r["n_base_models"] == 0 and r["itt_n_base_models"] == 1
    assert r["itt_base_models_compositional"] == 0
    lo, hi = inf.clopper_pearson(1, 2)
    assert (t["itt_base_models_compositional_lo"], t["itt_base_models_compositional_hi"]) == (
        lo, hi,
    )  # fmt: skip


# ----------------------------------------------------------------------------- paired tests


def _hand_sign_flip(d: list[float]) -> float:
    """Exact one-sided sign-flip p-value by enumerating every sign vector."""
    obs = float(np.mean(d))
    means = [np.mean([s * x for s, x in zip(signs, d)])
             for signs in itertools.product([1, -1], repeat=len(d))]  # fmt: skip
    return sum(m >= obs - 1e-12 for m in means) / len(means)


@pytest.mark.parametrize("d", [
    [1.0, 1.0, 1.0, 1.0, 1.0], [0.5, -0.5, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 0.25],
    [0.2, 0.4, 0.1, 0.3, 0.5, -0.1, 0.6],
])  # fmt: skip
def test_sign_flip_test_matches_enumeration(d):
    diff, p, method, n = inf.sign_flip_test(d)
    assert method == "exact" and n == 2 ** len(d)
    assert diff == pytest.approx(np.mean(d))
    assert p == pytest.approx(_hand_sign_flip(d))


def test_sign_flip_monte_carlo_is_close_to_exact_and_valid():
    rng = np.random.default_rng(0)
    d = rng.normal(0.2, 1.0, 12).tolist()
    exact = inf.sign_flip_test(d)[1]
    _, mc, method, n = inf.sign_flip_test(d, max_exact=4, n_perm=20_000, seed=1)
    assert method == "monte carlo" and n == 20_000
    assert abs(mc - exact) < 0.02 and mc > 0
    with pytest.raises(ValueError):
        inf.sign_flip_test([])


def _three_inits(n: int = 5) -> pd.DataFrame:
    """Pretrained: every run compositional; trained: seed-wise 1 of 2; random init excluded."""
    rows = []
    for s in range(n):
        rows += [_row("pretrained", s, 0, "comp"), _row("pretrained", s, 1, "comp")]
        rows += [_row("trained", s, 0, "comp"), _row("trained", s, 1, "not")]
        rows += [_row("random_init", s, 0, "excluded"), _row("random_init", s, 1, "excluded")]
    return pd.DataFrame(rows)


def test_paired_tests_by_hand_including_random_init():
    t = inf.paired_tests(_three_inits())
    t = t.set_index(["init", "control_init", "analysis"])
    assert len(t) == 6  # 3 comparisons x 2 analyses, none silently skipped
    # usable: pretrained 1.0 vs trained 0.5 in each of 5 pairs -> only the identity flip
    r = t.loc[("pretrained", "trained", "usable")]
    assert (r["n_pairs"], r["diff"]) == (5, pytest.approx(0.5))
    assert r["p_value"] == pytest.approx(1 / 32)
    # random init has no usable base model: the usable test says why, ITT runs it
    r = t.loc[("trained", "random_init", "usable")]
    assert math.isnan(r["p_value"]) and "usable runs under both" in r["note"]
    r = t.loc[("trained", "random_init", "itt")]
    assert r["n_pairs"] == 5 and r["diff"] == pytest.approx(0.5) and r["note"] == ""
    assert r["p_value"] == pytest.approx(1 / 32)
    r = t.loc[("pretrained", "random_init", "itt")]
    assert r["diff"] == pytest.approx(1.0) and r["p_value"] == pytest.approx(1 / 32)
    # Holm within the ITT family: three p-values of 1/32 -> 3/32 each
    itt = t.xs("itt", level="analysis")
    assert np.allclose(itt["p_holm"], inf.holm(itt["p_value"].to_numpy()))
    assert itt["p_holm"].max() == pytest.approx(3 / 32)


def test_paired_tests_pair_by_base_seed_only():
    df = _three_inits(3)
    df = df[~((df["init"] == "trained") & (df["base_seed"] == 2))]  # trained seed 2 missing
    r = inf.paired_tests(df).set_index(["init", "control_init", "analysis"])
    assert r.loc[("pretrained", "trained", "itt"), "n_pairs"] == 2


def test_paired_test_with_an_absent_init_says_why():
    df = _three_inits(3)
    df = df[df["init"] != "pretrained"]
    r = inf.paired_tests(df).set_index(["init", "control_init", "analysis"])
    note = r.loc[("pretrained", "trained", "usable"), "note"]
    assert "no base model of init pretrained" in note


def test_summary_table_carries_the_paired_columns():
    s = inf.summary_table(_three_inits()).set_index("init")
    assert s.loc["pretrained", "paired_vs_trained_usable_p"] == pytest.approx(1 / 32)
    assert s.loc["pretrained", "paired_vs_random_init_itt_n_pairs"] == 5
    assert "usable runs" in s.loc["trained", "paired_vs_random_init_usable_note"]


# ----------------------------------------------------------------------------- settings


def _n_random(d: dict) -> int:
    from subroutine_circuits.experiment.config import ExperimentConfig

    return int(d.get("n_random", ExperimentConfig().n_random))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_draws_at_least_99(path):
    assert _n_random(tomllib.loads(path.read_text())) >= 99


def test_the_demos_draw_at_least_99():
    from subroutine_circuits.experiment.config import demo_config
    from subroutine_circuits.experiment.vision import vision_demo_config

    assert demo_config().n_random >= 99
    assert vision_demo_config().n_random >= 99


def test_validate_studies_the_demos_settings():
    from subroutine_circuits.experiment.config import demo_config
    from subroutine_circuits.experiment.validate import (
        DEMO_ANALYSIS_FIELDS,
        ValidateConfig,
        experiment_config,
    )

    demo, got = demo_config(), experiment_config(ValidateConfig())
    # validate adds the frontier's mask path, which decides no verdict (issue 23)
    assert got.mask.frontier_path and not demo.mask.frontier_path
    got.mask = replace(got.mask, frontier_path=False)
    for name in DEMO_ANALYSIS_FIELDS:
        assert getattr(got, name) == getattr(demo, name), name
    defaults = experiment_config(ValidateConfig(settings="defaults"))
    assert defaults.mask != demo.mask
    with pytest.raises(ValueError, match="settings"):
        ValidateConfig(settings="fast").validate()
