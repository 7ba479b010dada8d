"""Per-run bootstrap intervals over test problems: ``sub_diff_lo`` ... ``abl_diff_hi`` of the
ablation matrix (``analysis.inference.problem_bootstrap`` from correct counts) and
``straddles_margin``. Properties only, no float outcomes of one CPU."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from subroutine_circuits.analysis import inference as inf
from subroutine_circuits.utils import clipped_diff

INTERVAL_COLUMNS = ("sub_diff_lo", "sub_diff_hi", "abl_diff_lo", "abl_diff_hi")


def boot(kt: int, nt: int, ko: int, no: int, chance: float = 0.25, seed: int = 0, **kw):
    return inf.problem_bootstrap(kt, ko, chance, seed=seed, n_target=nt, n_other=no, **kw)


# ---------------------------------------------------------------------------- problem_bootstrap
@pytest.mark.parametrize(
    "kt, nt, ko, no",
    [(30, 40, 10, 40), (12, 40, 30, 40), (11, 40, 9, 40), (3, 12, 4, 12), (199, 200, 1, 150),
     (50, 200, 52, 200), (1, 7, 6, 7)],
)  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_interval_contains_the_point_estimate(kt, nt, ko, no, seed):
    b = boot(kt, nt, ko, no, seed=seed)
    assert b["diff"] == clipped_diff(kt / nt, ko / no, 0.25)
    assert b["lo"] <= b["diff"] <= b["hi"]


@pytest.mark.parametrize("chance", [0.0, 0.25, 0.5])
def test_interval_is_degenerate_when_every_problem_is_right_or_wrong(chance):
    """All correct or all wrong in both partitions: every resample is the same problem set."""
    for kt, ko in ((40, 0), (0, 30), (40, 30), (0, 0)):
        b = boot(kt, 40, ko, 30, chance)
        expected = clipped_diff(kt / 40, ko / 30, chance)
        assert b["lo"] == b["hi"] == b["diff"] == expected
        assert b["se"] == 0.0
    # one partition mixed: the interval has width (unless chance clips it away, below)
    mixed = boot(40, 40, 15, 30, chance)
    assert mixed["lo"] < mixed["hi"]


def test_clipping_at_chance_can_make_the_interval_degenerate():
    """Both partitions so far below chance that no resample reaches it: every difference is
    clipped to 0, although the problems are not all right or all wrong."""
    b = boot(1, 400, 2, 400, chance=0.25)
    assert b["lo"] == b["hi"] == b["diff"] == 0.0


def test_interval_widens_as_the_test_set_shrinks():
    """Same accuracies (0.7 vs 0.4) over 40 and over 4000 problems per partition."""
    small, large = boot(28, 40, 16, 40), boot(2800, 4000, 1600, 4000)
    assert small["diff"] == pytest.approx(large["diff"])
    w_small, w_large = small["hi"] - small["lo"], large["hi"] - large["lo"]
    assert w_large > 0 and w_small > 5 * w_large  # sqrt(100) = 10 in theory
    assert small["lo"] <= large["lo"] and large["hi"] <= small["hi"]


@pytest.mark.parametrize(
    "kt, nt, ko, no, chance",
    [(150, 200, 60, 150, 0.25), (70, 120, 38, 150, 0.25), (45, 60, 50, 60, 0.0)],
)
def test_interval_matches_resampling_the_correctness_vectors(kt, nt, ko, no, chance):
    """An independent bootstrap (resampling the 0/1 vectors with ``choice``) agrees within
    Monte Carlo and lattice error."""
    rng = np.random.default_rng(2024)
    t = np.r_[np.ones(kt), np.zeros(nt - kt)]
    o = np.r_[np.ones(ko), np.zeros(no - ko)]
    reps = 20_000
    bt = rng.choice(t, (reps, nt), replace=True).mean(1)
    bo = rng.choice(o, (reps, no), replace=True).mean(1)
    ref = np.quantile(clipped_diff(bt, bo, chance), [0.025, 0.975])
    b = boot(kt, nt, ko, no, chance, seed=7)
    assert b["lo"] == pytest.approx(ref[0], abs=0.03)
    assert b["hi"] == pytest.approx(ref[1], abs=0.03)


def test_counts_and_vectors_give_the_same_bootstrap():
    """The count form is the vector form: same numbers for the same seed (old calls keep their
    results)."""
    rng = np.random.default_rng(3)
    t, o = rng.random(90) < 0.7, rng.random(70) < 0.45
    vec = inf.problem_bootstrap(t, o, seed=5, margin=0.1)
    cnt = inf.problem_bootstrap(
        int(t.sum()), int(o.sum()), seed=5, margin=0.1, n_target=90, n_other=70
    )
    assert vec == cnt
    numpy_counts = inf.problem_bootstrap(np.int64(3), 4.0, n_target=10, n_other=np.int64(10))
    assert numpy_counts["diff"] == clipped_diff(0.3, 0.4, 0.25)


@pytest.mark.parametrize(
    "args, kw",
    [((3, 4), {"n_target": 10}), ((11, 4), {"n_target": 10, "n_other": 10}),
     ((2.5, 4), {"n_target": 10, "n_other": 10}), ((0, 0), {"n_target": 0, "n_other": 10}),
     ((-1, 0), {"n_target": 5, "n_other": 10})],
)  # fmt: skip
def test_bad_counts_are_refused(args, kw):
    with pytest.raises(ValueError):
        inf.problem_bootstrap(*args, **kw)


# ---------------------------------------------------------------------------- straddles_margin
def test_straddles_margin():
    def row(s_lo, s_hi, a_lo, a_hi):
        return {"sub_diff_lo": s_lo, "sub_diff_hi": s_hi, "abl_diff_lo": a_lo, "abl_diff_hi": a_hi}

    m = 0.05
    assert not inf.straddles_margin(row(0.1, 0.4, -0.5, -0.2), m)  # both clear of the margins
    assert not inf.straddles_margin(row(-0.2, 0.02, 0.0, 0.3), m)  # both clearly fail
    assert inf.straddles_margin(row(0.01, 0.3, -0.5, -0.2), m)  # sub interval holds +margin
    assert inf.straddles_margin(row(0.1, 0.4, -0.3, 0.0), m)  # abl interval holds -margin
    assert inf.straddles_margin(row(0.0, 0.049, -0.049, 0.0), m) is False  # just short of both
    assert inf.straddles_margin(row(0.05, 0.4, -0.5, -0.2), m)  # bounds count (lo <= m)
    assert inf.straddles_margin(row(0.1, 0.4, -0.5, -0.05), m)
    assert inf.straddles_margin(pd.Series(row(0.01, 0.3, -0.5, -0.2)), m)
    assert inf.straddles_margin(row(0.01, 0.3, -0.5, -0.2), 0.0) is False
    # absent or NaN intervals say nothing
    assert inf.straddles_margin({"sub_diff": 0.06, "abl_diff": -0.06}, m) is False
    assert inf.straddles_margin(pd.Series(row(math.nan, math.nan, None, None)), m) is False
    assert inf.straddles_margin(row(math.nan, math.nan, -0.3, 0.0), m)  # the other pair speaks
    assert inf.straddles_margin(row(0.0, 0.1, math.nan, -0.2), m)


# ---------------------------------------------------------------------------- evaluation
def random_test_split(g: torch.Generator, n: int = 12) -> dict:
    """Random token problems (``n`` per kind, 4 stimuli of 7 tokens) for subroutines a, b."""
    from subroutine_circuits.adapters.base import EncodedProblems

    def problems(n):
        toks = torch.randint(1, 50, (n, 4, 7), generator=g)
        return EncodedProblems({"tokens": toks, "lengths": torch.full((n, 4), 7)},
                               torch.randint(0, 4, (n,), generator=g))  # fmt: skip

    return {k: problems(n) for k in ("partition_a", "partition_b", "sub_a", "sub_b")}


def check_rows(rows, runs, test, chance=0.25):
    """Interval columns present, containing their point estimates, and equal to the count
    bootstrap of the row's accuracies with the run's seed."""
    from subroutine_circuits.experiment.evaluate import BOOT_REPLICATES, _boot_seed

    for r, row in zip(runs, rows):
        n_t, n_o = len(test[f"partition_{r.subroutine}"]), len(test[f"partition_{r.other}"])
        for col, cond in (("sub_diff", "sub"), ("abl_diff", "abl")):
            assert row[f"{col}_lo"] <= row[col] <= row[f"{col}_hi"]
            kt, ko = row[f"{cond}_target_acc"] * n_t, row[f"{cond}_other_acc"] * n_o
            assert kt == pytest.approx(round(kt), abs=1e-9)
            b = boot(round(kt), n_t, round(ko), n_o, chance, _boot_seed(r, col),
                     n_boot=BOOT_REPLICATES)  # fmt: skip
            assert row[f"{col}_lo"] == min(b["lo"], row[col])
            assert row[f"{col}_hi"] == max(b["hi"], row[col])


def test_unit_evaluation_gives_reproducible_intervals():
    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.experiment.evaluate import RunToEvaluate, evaluate_unit_runs
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    model = make_tiny_transformer(seed=4)
    g = torch.Generator().manual_seed(0)
    test = random_test_split(g)
    um = tl_unit_map(model)
    masks = [UnitMask.fixed(um, torch.rand(um.n_units, generator=g) < p) for p in (0.3, 0.7)]
    runs = [RunToEvaluate("a", "b", 0, masks[0], True, 1),
            RunToEvaluate("b", "a", 3, masks[1], False, 2)]  # fmt: skip
    adapter = as_adapter(model, pool="last")
    abls = {"zero": Ablator("zero")}
    rows = evaluate_unit_runs(adapter, runs, test, abls, "zero", n_random=3)
    check_rows(rows, runs, test)
    again = evaluate_unit_runs(adapter, runs[::-1], test, abls, "zero", n_random=3)[::-1]
    for row, other in zip(rows, again):  # the seed follows the run, not its place in the batch
        assert {c: row[c] for c in INTERVAL_COLUMNS} == {c: other[c] for c in INTERVAL_COLUMNS}


def test_weight_evaluation_and_ablation_matrix_give_intervals():
    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.evaluate import (
        RunToEvaluate,
        ablation_matrix,
        evaluate_weight_runs,
    )
    from subroutine_circuits.masks import UnitMask, WeightMask

    model = make_tiny_transformer(seed=5)
    adapter = as_adapter(model, pool="last")
    g = torch.Generator().manual_seed(1)
    test = random_test_split(g, n=10)
    names = adapter.weight_names()[:2]
    n = sum(int(dict(model.named_parameters())[k].numel()) for k in names)
    wm = WeightMask.fixed(model, torch.rand(n, generator=g) < 0.5, names, init_std=0.02)
    runs = [RunToEvaluate("a", "b", 2, wm, True, 4)]
    rows = evaluate_weight_runs(adapter, runs, test, n_random=2)
    check_rows(rows, runs, test)

    from subroutine_circuits.adapters import tl_unit_map

    um = tl_unit_map(model)
    mask = UnitMask.fixed(um, torch.rand(um.n_units, generator=g) < 0.5)
    row = ablation_matrix(adapter, mask, test, "b", "a", seed=6, ablation="zero", n_random=2)
    check_rows([row], [RunToEvaluate("b", "a", 6, mask)], test)


def test_result_columns_list_the_intervals_after_abl_diff():
    from subroutine_circuits.experiment.runner import RESULT_COLUMNS

    i = RESULT_COLUMNS.index("abl_diff")
    assert tuple(RESULT_COLUMNS[i + 1 : i + 5]) == INTERVAL_COLUMNS
