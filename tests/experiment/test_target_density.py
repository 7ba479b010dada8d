"""Target-density mask search (issue 23): the Lagrange multiplier's dual ascent, masks that
reach their target density in both engines, and the "smallest" choice rule."""

from __future__ import annotations

import math

import pytest
import torch

from subroutine_circuits.experiment.schedule import DensityMultiplier


def test_multiplier_rises_above_target_only_and_leaves_fixed_weights():
    m = DensityMultiplier([0.5, 1.0, 2.0], [0.1, math.nan, 0.3], lr=2.0)
    assert m.weight([0, 1, 2]).tolist() == [0.5, 1.0, 2.0]
    m.update([0, 1, 2], torch.tensor([0.6, 0.9, 0.1]))
    # 0.5 + 2 * (0.6 - 0.1) = 1.5; no target: unchanged; below its target: unchanged
    assert m.weight([0, 1, 2]).tolist() == pytest.approx([1.5, 1.0, 2.0])
    # the term: a hinge on the binary-kept share for masks with a target, weight * L0 / n else
    w = m.weight([0, 1, 2])
    l0, soft = torch.tensor([50.0, 40.0, 30.0]), torch.tensor([30.0, 20.0, 10.0])
    term = m.penalty([0, 1, 2], w, l0, 100, soft)
    assert term.tolist() == pytest.approx([1.5 * (0.3 - 0.1), 1.0 * 40 / 100, 0.0])
    # without any target the term is exactly weight * L0 / n (the study's unchanged loss)
    free = DensityMultiplier([0.5], [math.nan], lr=1.0)
    assert torch.equal(free.penalty([0], free.weight([0]), l0[:1], 100), 0.5 * l0[:1] / 100)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="target densities"):
            DensityMultiplier([1.0], [bad], lr=1.0)
    with pytest.raises(ValueError, match="target_lr"):
        DensityMultiplier([1.0], [0.1], lr=0.0)


def _trained_setup():
    from subroutine_circuits.experiment import config_from_dict
    from subroutine_circuits.experiment.data import prepare
    from subroutine_circuits.experiment.stages import build_base_model

    cfg = config_from_dict(
        {
            "task": "agreement_singular",
            "inits": ["trained"],
            "data": {"n_train": 120, "n_val": 40, "n_test": 40},
            "model": {"preset": "tiny", "overrides": {"d_mlp": 32}},
            "train": {"max_steps": 60, "eval_every": 60},
        }
    )
    prep = prepare(cfg)
    model, _ = build_base_model(cfg, prep, "trained", 0, "cpu")
    return cfg, prep, model


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return _trained_setup()


def test_masks_reach_their_target_in_both_engines(trained):
    """Without a sparsity weight a mask keeps most units; with a target density of 10% its
    expected density is driven to the target (each engine: the study's converged loop and
    the single-mask loop), whatever cross-entropy that costs."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.converge import train_masks_converged
    from subroutine_circuits.experiment.schedule import Schedule
    from subroutine_circuits.experiment.search import encode, train_mask_run
    from subroutine_circuits.masks.ablator import Ablator

    cfg, prep, model = trained
    adapter = as_adapter(model, tokenizer=prep.tokenizer, pool="last").freeze()
    train = encode(adapter, prep.splits["train"]["sub_subject_plural"], "cpu")
    mcfg = MaskSearchConfig(lr=0.1, init=2.0, patience=0)  # target_lr: the default
    sched = Schedule(steps=200, eval_every=200, patience=0)
    free, target = {"l0_weight": 0.0}, {"l0_weight": 0.0, "target_density": 0.1}
    runs = train_masks_converged(
        model, [train], [train], mcfg, [free, target], [0, 0], sched, Ablator("zero"), "last",
        adapter=adapter,
    )  # fmt: skip
    free_d, target_d = runs[0].mask.density(), runs[1].mask.density()
    assert free_d > 0.5
    assert target_d <= 0.15
    single = train_mask_run(adapter, train, mcfg, target, 0, schedule=sched)
    assert single.mask.density() <= 0.15


def test_smallest_rule_takes_the_sparsest_point_reaching_the_threshold():
    from subroutine_circuits.experiment.converge import MaskRun
    from subroutine_circuits.experiment.search import choose_point

    def run(acc, density):
        return MaskRun(None, acc, density, 1, 1, None, False)

    runs = {(0, 0): run(1.00, 0.30), (1, 0): run(0.93, 0.05), (2, 0): run(0.80, 0.01)}
    assert choose_point(runs, 3, 0.02)[0] == 0  # accurate: 0.93 is not within 0.02 of 1.0
    assert choose_point(runs, 3, 0.02, "smallest", min_acc=0.9)[0] == 1
    # nobody reaches the threshold: the accurate choice
    assert choose_point(runs, 3, 0.02, "smallest", min_acc=1.1)[0] == 0
    with pytest.raises(ValueError, match="choice rule"):
        choose_point(runs, 3, 0.02, "largest")
