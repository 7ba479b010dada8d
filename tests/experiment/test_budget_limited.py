"""Budget-limited mask searches (issue 23): a search that ran its whole budget while still
improving is flagged in results.csv and counted in summary.csv, never taken as converged."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from subroutine_circuits.experiment.schedule import BUDGET_TAIL, budget_limited


def _history(steps: int, densities: list[float]) -> list[tuple[int, float, float]]:
    every = steps // (len(densities) - 1)
    return [(i * every, 0.95, d) for i, d in enumerate(densities)]


def test_a_plateau_stop_is_never_budget_limited():
    assert not budget_limited(100, 99, True, _history(100, [0.5, 0.4, 0.1]))


def test_best_checkpoint_in_the_last_tenth_is_budget_limited():
    """The boundary: the tail is the last ceil(10%) of the steps taken."""
    steps = 200
    start = steps - math.ceil(BUDGET_TAIL * steps)
    flat = _history(steps, [0.3, 0.3, 0.3, 0.3, 0.3])
    assert budget_limited(steps, start + 1, False, flat)
    assert not budget_limited(steps, start, False, flat)


def test_density_still_falling_in_the_tail_is_budget_limited():
    """Chosen early, but the density kept falling at the end by more than min_density_drop."""
    falling = [(0, 0.9, 0.5), (50, 0.95, 0.4), (90, 0.95, 0.35), (100, 0.95, 0.30)]
    assert budget_limited(100, 50, False, falling, min_density_drop=0.01)
    assert not budget_limited(100, 50, False, falling, min_density_drop=0.1)  # within the drop
    steady = [(0, 0.9, 0.5), (50, 0.95, 0.4), (90, 0.95, 0.4), (100, 0.95, 0.4)]
    assert not budget_limited(100, 50, False, steady, min_density_drop=0.01)


def test_no_history_decides_by_the_best_step_alone():
    assert not budget_limited(100, 10, False, [])
    assert budget_limited(100, 100, False, [])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from test_verdicts import tiny_config

    from subroutine_circuits.experiment import config_from_dict, run_experiment

    out = tmp_path_factory.mktemp("budget")
    run_experiment(config_from_dict(tiny_config()), out, progress=False)
    return pd.read_csv(out / "results.csv"), pd.read_csv(out / "summary.csv")


def test_results_flag_and_summary_count_agree(study):
    """mask_budget_limited follows its definition's necessary parts on every row, and
    summary.csv counts exactly the flagged runs of each cell."""
    results, summary = study
    flag = results["mask_budget_limited"].astype(bool)
    assert not (flag & results["mask_stopped_early"].astype(bool)).any()
    tail_start = results["mask_steps"] - (BUDGET_TAIL * results["mask_steps"]).apply(math.ceil)
    late = ~results["mask_stopped_early"].astype(bool) & (results["mask_best_step"] > tail_start)
    assert flag[late].all()
    counts = results.groupby(["init", "subroutine"])["mask_budget_limited"].sum()
    for _, row in summary.iterrows():
        assert row["runs_budget_limited"] == counts[(row["init"], row["subroutine"])]
