"""Issue 22: the sequential matched null (``random_shortcuts``) gives the verdicts of all 99
draws, evaluated against the full evaluation of the same draws on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from subroutine_circuits.analysis.inference import RANDABL_ALPHA
from subroutine_circuits.experiment.evaluate import (
    RunToEvaluate,
    _add_random_controls,
    sequential_randabl_p,
    stop_hits,
)


@pytest.mark.parametrize("n", [19, 20, 39, 99, 100, 199, 999])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_stop_hits_is_the_first_hit_count_that_fails(n, alpha):
    h = stop_hits(n, alpha)
    assert (1 + h) / (1 + n) > alpha
    assert h == 0 or h / (1 + n) <= alpha  # h - 1 hits still pass
    # a run stopped at its h-th hit after any number of draws reports p > alpha
    for drawn in range(max(h, 1), n + 1):
        assert sequential_randabl_p(h, drawn, n, stopped=True) > alpha


def test_five_hits_of_99_stop_the_null():
    assert stop_hits(99, 0.05) == 5
    assert sequential_randabl_p(4, 99, 99, stopped=False) == pytest.approx(0.05)


def _tiny():
    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.masks.ablator import Ablator

    model = make_tiny_transformer(seed=3)
    g = torch.Generator().manual_seed(1)

    def problems(n):
        toks = torch.randint(1, 50, (n, 4, 7), generator=g)
        return EncodedProblems({"tokens": toks, "lengths": torch.full((n, 4), 7)},
                               torch.randint(0, 4, (n,), generator=g))  # fmt: skip

    test = {k: problems(12) for k in ("partition_a", "partition_b")}
    um = tl_unit_map(model)
    learned = torch.rand(um.n_units, generator=g) < 0.3
    return as_adapter(model, pool="last"), um, test, learned, Ablator("zero")


@pytest.mark.parametrize("learned_diff", [-0.75, -0.25, 0.0, 0.25, 0.75])
def test_shortcuts_give_the_verdict_of_every_draw(learned_diff):
    """The learned abl_diff is set by hand (on the lattice of 12 problems per partition) so that
    the hits range from none to all; the same 99 draws are evaluated in full and with the
    shortcuts."""
    from subroutine_circuits.masks import UnitMask

    adapter, um, test, learned, ablator = _tiny()
    run = RunToEvaluate("a", "b", 0, UnitMask.fixed(um, learned), True, draw_seed=7)
    out = {}
    for shortcuts in (False, True):
        row = {"abl_diff": learned_diff}
        _add_random_controls(adapter, [run], [row], [learned], [True], test, ablator, 99, 0.25,
                             shortcuts)  # fmt: skip
        out[shortcuts] = row
    full, short = out[False], out[True]
    assert full["n_random"] == 99 and not full["randabl_stopped"]
    assert full["randabl_n_screened"] == 0
    assert (full["randabl_p"] <= RANDABL_ALPHA) == (short["randabl_p"] <= RANDABL_ALPHA)
    if short["randabl_stopped"]:
        assert short["n_random"] <= 99 and short["randabl_p"] > RANDABL_ALPHA
        assert full["randabl_p"] >= (1 + stop_hits(99, RANDABL_ALPHA)) / 100
    else:
        assert short["n_random"] == 99
        assert short["randabl_p"] == full["randabl_p"]  # the same hits, counted exactly
    if learned_diff == 0.75:  # every draw is a hit: stop at the fifth
        assert short["randabl_stopped"] and short["n_random"] == 5
    if learned_diff == -0.75:  # only a draw at the floor can hit: most are screened
        assert short["randabl_n_screened"] > 0
    # the screened draws are counted among the draws made, never as hits
    assert short["randabl_n_screened"] <= short["n_random"]
    assert np.isfinite(short["randabl_target_acc"])


def test_no_draws_for_a_mask_that_fails_its_held_out_problems():
    """A run whose mask misses ``min_sub_acc`` on the test ``sub_<p>`` problems is "search
    failed" (``mask_ok`` needs them): it gets no random draws, the same run with the bar met
    does."""
    from subroutine_circuits.experiment.evaluate import evaluate_unit_runs
    from subroutine_circuits.masks import UnitMask

    adapter, um, test, learned, ablator = _tiny()
    test = {**test, "sub_a": test["partition_a"]}
    mask = UnitMask.fixed(um, learned)
    got = {}
    for bar in (0.0, 1.01):
        run = RunToEvaluate("a", "b", 0, mask, True, draw_seed=7, min_sub_acc=bar)
        got[bar] = evaluate_unit_runs(adapter, [run], test, {"zero": ablator}, "zero", 20)[0]
    assert got[0.0]["n_random"] > 0 and got[1.01]["n_random"] == 0
    assert np.isnan(got[1.01]["randabl_p"])
