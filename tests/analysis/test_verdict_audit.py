"""Issue 22, first slice: the verdict's order, exact ties of ``randabl_p`` and the paper's
criterion beside ours (``margins_ok``, ``paper_compositional``), each against a hand count."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from subroutine_circuits.analysis import inference as inf
from subroutine_circuits.utils import clipped_diff

N = 100  # test problems per partition in the tie examples
#: The learned mask of the tie examples: target 30 / 100 correct, other 60 / 100 -> -0.3.
LEARNED = (30, 60)
#: Draws with the learned mask's abl_diff (-0.3 exactly) whose float difference rounds ABOVE the
#: learned one's (-0.29999999999999993 vs -0.3): a float ``<=`` misses these ties.
FLOAT_ABOVE_TIES = [(27, 57), (28, 58), (39, 69), (40, 70), (52, 82)]
#: A draw clearly above (less specific than) the learned mask: -0.1.
ABOVE = (50, 60)


def _row(sub_diff: float, abl_diff: float, randabl_p: float = 0.01, seed: int = 0, **kw):
    """One results row of base model ``base_seed`` 0 (trained, subroutine "subject")."""
    row = {
        "task": "sva",
        "model": "tiny",
        "init": "trained",
        "subroutine": "subject",
        "base_seed": 0,
        "mask_seed": seed,
        "base_ok": True,
        "bypass": False,
        "mask_ok": True,
        "sub_diff": sub_diff,
        "abl_diff": abl_diff,
        "randabl_p": randabl_p,
    }
    row.update(kw)
    return row


def _diff(counts: tuple[int, int], n: int = N) -> float:
    """The clipped difference of two accuracies computed as the study does: count / n."""
    return clipped_diff(counts[0] / n, counts[1] / n)


# ----------------------------------------------------------------------------- verdict order


def test_compositional_run_and_margin_failure_count_one_of_two():
    """The regression of issue 22: a margin failure without random draws (``random_controls =
    "candidates"`` skips them) used to be "no random control" and leave the denominator, so
    this base model counted 1 of 1 usable runs ("mostly compositional"); it is 1 of 2."""
    runs = pd.DataFrame([_row(0.4, -0.4, 0.01, seed=0), _row(0.0, 0.02, float("nan"), seed=1)])
    v = inf.run_verdicts(runs)
    assert v["verdict"].tolist() == ["compositional", "not compositional"]
    bm = inf.base_model_table(runs).iloc[0]
    assert (bm["n_usable"], bm["n_compositional"], bm["n_no_control"]) == (2, 1, 0)
    assert bm["frac_compositional"] == 0.5 and not bm["mostly_compositional"]
    cell = inf.summarize_cells(runs).iloc[0]
    assert (cell["n_base_models"], cell["base_models_compositional"]) == (1, 0)
    assert (cell["runs_usable"], cell["runs_compositional"], cell["runs_no_control"]) == (2, 1, 0)


def test_two_margin_failures_count_zero_of_two():
    """Two margin failures without draws: 0 of 2 usable runs (it used to be "unusable")."""
    runs = pd.DataFrame(
        [_row(0.0, 0.02, float("nan"), seed=0), _row(0.3, 0.0, float("nan"), seed=1)]
    )
    bm = inf.base_model_table(runs).iloc[0]
    assert bm["has_usable"] and (bm["n_usable"], bm["n_compositional"]) == (2, 0)
    assert bm["frac_compositional"] == 0.0
    cell = inf.summarize_cells(runs).iloc[0]
    assert (cell["n_base_models"], cell["n_base_models_unusable"]) == (1, 0)
    assert cell["base_models_compositional"] == 0 and cell["base_models_compositional_frac"] == 0


def test_the_permutation_test_sees_margin_failures():
    """The base-model fractions of the permutation test follow run_verdict: a trained base
    model with one compositional run and one margin failure enters at 0.5, not 1.0."""
    rows = [
        _row(0.4, -0.4, 0.01, seed=0),
        _row(0.0, 0.0, float("nan"), seed=1),
        _row(0.0, 0.0, float("nan"), seed=0, init="random_init"),
        _row(0.0, 0.0, float("nan"), seed=1, init="random_init"),
    ]
    tests = inf.cell_tests(pd.DataFrame(rows), [("trained", "random_init")])
    assert tests.loc[0, "mean_frac"] == 0.5 and tests.loc[0, "mean_frac_control"] == 0.0
    assert tests.loc[0, "n_base_models_control"] == 1  # it had no usable run before


@pytest.mark.parametrize("p", [float("nan"), None, 0.001, 0.5])
@pytest.mark.parametrize(
    "sub_diff,abl_diff",
    [(0.0, -0.4), (0.05, -0.4), (0.4, 0.0), (0.4, -0.05), (-0.2, 0.3)],
)
def test_a_margin_failure_is_never_no_random_control(sub_diff, abl_diff, p):
    row = _row(sub_diff, abl_diff, p)
    if p is None:
        del row["randabl_p"]
    assert inf.run_verdict(row, margin=0.05) == "not compositional"
    cols = inf.verdict_columns(row, margin=0.05)
    assert not cols["margins_ok"] and not cols["paper_compositional"]


def test_margins_pass_without_randabl_p_is_no_random_control():
    assert inf.run_verdict(_row(0.4, -0.4, float("nan"))) == "no random control"
    # a bad randabl_p of a run that passes the margins is an error, not a verdict
    with pytest.raises(ValueError, match="randabl_p"):
        inf.run_verdict(_row(0.4, -0.4, "n/a"))


# ----------------------------------------------------------------------------- alpha and ties


@pytest.mark.parametrize("n_ties,passes", [(0, True), (4, True), (5, False)])
def test_ties_at_99_draws_against_alpha(n_ties, passes):
    """99 draws: 0 or 4 draws tying the learned abl_diff give p = 1/100 or 5/100 and pass
    alpha = 0.05; 5 ties give 6/100 and fail. The ties' float differences round above the
    learned one's, so only an exact comparison finds them."""
    ties = FLOAT_ABOVE_TIES[:n_ties]
    draws = [_diff(c) for c in ties] + [_diff(ABOVE)] * (99 - n_ties)
    learned = _diff(LEARNED)
    assert all(d > learned for d in draws)  # as floats, no draw is at most the learned value
    p = inf.randabl_p(learned, draws, n_problems=(N, N))
    assert p == pytest.approx((1 + n_ties) / 100, abs=0)
    assert (inf.run_verdict(_row(0.4, learned, p)) == "compositional") is passes
    # without the numbers of problems the tolerance finds the same ties
    assert inf.randabl_p(learned, draws) == p


def test_equal_counts_compare_equal():
    """Draws with the learned mask's exact abl_diff are ties whatever the float rounding: the
    issue's 0.3 / 0.6 vs 0.32 / 0.62, pairs whose floats differ by 1e-16 in either direction,
    and a draw whose target accuracy is clipped to chance (0.25 - 0.55)."""
    learned = _diff(LEARNED)
    ties = [(32, 62), *FLOAT_ABOVE_TIES, (25, 55), (26, 56), (20, 55)]
    floats = [_diff(c) for c in ties]
    assert len(set(floats)) > 1  # the floats disagree ...
    k, lattice = inf.clipped_diff_units([learned, *floats], (N, N))
    assert lattice == 100 and (k == -30).all()  # ... the counts do not
    assert inf.randabl_p(learned, floats, n_problems=(N, N)) == 1.0
    # unequal counts never tie: one correct answer more on the other partition is -0.31
    assert inf.randabl_p(learned, [_diff((30, 61))], n_problems=(N, N)) == 1.0
    assert inf.randabl_p(learned, [_diff((31, 60))], n_problems=(N, N)) == 0.5


def test_random_columns_decide_ties_exactly():
    """The evaluation passes the numbers of test problems: ``_random_columns`` (unit and
    weight masks) counts float-above ties of the learned abl_diff."""
    from subroutine_circuits.experiment.evaluate import _random_columns

    t = np.array([c[0] for c in FLOAT_ABOVE_TIES[:4]] + [ABOVE[0]] * 95) / N
    o = np.array([c[1] for c in FLOAT_ABOVE_TIES[:4]] + [ABOVE[1]] * 95) / N
    cols = _random_columns(_diff(LEARNED), t, o, 99, 0.25, (N, N))
    assert cols["randabl_p"] == 5 / 100
    assert inf.run_verdict(_row(0.4, _diff(LEARNED), cols["randabl_p"])) == "compositional"


def test_clipped_diff_units_lattice_and_errors():
    # partitions of different sizes: the lattice is lcm(n_t, n_o, 4)
    d = clipped_diff(7 / 40, 30 / 50)  # target clipped to 0.25: 0.25 - 0.6 = -0.35
    k, lattice = inf.clipped_diff_units([d, clipped_diff(0.25, 0.6)], (40, 50))
    assert lattice == 200 and k.tolist() == [-70, -70]
    with pytest.raises(ValueError, match="not a clipped difference"):
        inf.clipped_diff_units([0.123456], (40, 50))
    with pytest.raises(ValueError, match="NaN"):
        inf.clipped_diff_units([float("nan")], (40, 50))
    with pytest.raises(ValueError, match="positive"):
        inf.clipped_diff_units([0.0], (0, 50))
    with pytest.raises(ValueError, match="not a clipped difference"):
        inf.randabl_p(-0.3, [0.1234567], n_problems=(N, N))
    # chance 1/3 (a 3-way readout) is read as the fraction 1/3
    k, lattice = inf.clipped_diff_units([clipped_diff(0.1, 0.5, 1 / 3)], (10, 10), 1 / 3)
    assert lattice == 30 and k.tolist() == [-5]


# ----------------------------------------------------------------------------- paper criterion


def _hand(row: dict, margin: float = 0.05) -> tuple[bool, bool]:
    """(margins_ok, paper_compositional) by hand."""
    m = row["sub_diff"] > margin and row["abl_diff"] < -margin
    usable = row["base_ok"] and not row["bypass"] and row["mask_ok"]
    return m, bool(usable and m)


def _paper_rows() -> list[dict]:
    """Base model 0: compositional, margins only (p 0.4), no control; base model 1: margin
    failure, failed search that passes the margins; base model 2: excluded, margins pass."""
    return [
        _row(0.4, -0.4, 0.01, seed=0),
        _row(0.4, -0.4, 0.4, seed=1),
        _row(0.4, -0.4, float("nan"), seed=2),
        _row(0.0, 0.1, float("nan"), seed=0, base_seed=1),
        _row(0.4, -0.4, float("nan"), seed=1, base_seed=1, mask_ok=False),
        _row(0.4, -0.4, 0.01, seed=0, base_seed=2, base_ok=False),
        _row(0.4, -0.4, 0.01, seed=1, base_seed=2, base_ok=True, bypass=True),
    ]


def test_margins_ok_and_paper_compositional_by_hand():
    rows = _paper_rows()
    for row in rows:
        cols = inf.verdict_columns(row)
        assert (cols["margins_ok"], cols["paper_compositional"]) == _hand(row)
        assert cols["verdict"] == inf.run_verdict(row)
        assert cols["compositional"] == (cols["verdict"] == "compositional")
    v = inf.run_verdicts(pd.DataFrame(rows))
    assert v["margins_ok"].tolist() == [_hand(r)[0] for r in rows]
    assert v["paper_compositional"].tolist() == [_hand(r)[1] for r in rows]
    assert v["margins_ok"].dtype == bool and v["paper_compositional"].dtype == bool
    # NaN / absent measurements do not pass the margins
    assert not inf.margins_ok(float("nan"), -0.4) and not inf.margins_ok(None, -0.4)
    assert inf.margins_ok(0.06, -0.06, 0.05) and not inf.margins_ok(0.05, -0.4, 0.05)


def test_summary_counts_the_paper_criterion_beside_ours():
    cell = inf.summary_table(pd.DataFrame(_paper_rows())).iloc[0]
    # ours: base model 0 has 2 usable runs (1 compositional, 1 not; 1 no control), base model
    # 1 has 1 usable run (the margin failure), base model 2 is excluded
    assert (cell["runs_usable"], cell["runs_compositional"], cell["runs_no_control"]) == (3, 1, 1)
    assert (cell["n_base_models"], cell["base_models_compositional"]) == (2, 0)
    # the paper: base model 0 has 3 of 3 runs by the margins, base model 1 0 of 1
    assert (cell["paper_runs_usable"], cell["paper_runs_compositional"]) == (4, 3)
    assert (cell["paper_n_base_models"], cell["paper_base_models_compositional"]) == (2, 1)


def test_results_csv_gets_the_verdict_columns_recomputed(tmp_path):
    """collect_results writes margins_ok / paper_compositional next to the verdict and
    recomputes the verdict of run files written by an older version (old order)."""
    from subroutine_circuits.experiment.runner import RESULT_COLUMNS, collect_results
    from subroutine_circuits.store import RunStore

    store = RunStore(tmp_path)
    old = {**_row(0.0, 0.1, float("nan")), "verdict": "no random control"}
    new = {**_row(0.4, -0.4, 0.05, seed=1), **inf.verdict_columns(_row(0.4, -0.4, 0.05))}
    store.write_run("a", old)
    store.write_run("b", new)
    df = collect_results(tmp_path, margin=0.05)
    assert {"margins_ok", "paper_compositional"} <= set(RESULT_COLUMNS)
    csv = pd.read_csv(store.results_csv).sort_values("mask_seed")
    assert csv["verdict"].tolist() == ["not compositional", "compositional"]
    assert csv["margins_ok"].tolist() == [False, True]
    assert csv["paper_compositional"].tolist() == [False, True]
    assert csv["compositional"].tolist() == [False, True]
    assert len(df) == 2 and not math.isnan(df["sub_diff"].iloc[0])
