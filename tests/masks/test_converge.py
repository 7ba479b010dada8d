"""Converged mask training (epoch budget, plateau stop, temperature schedule) and the ablator.

The batched loop (several masks and datasets at once, finished masks dropped) must give the
masks of separate ``train_mask_run`` calls; position-aware mean ablation must equal hand-written
TransformerLens hooks; resample ablation from a source set holding only the evaluated stimuli
must leave the model unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_transformer
from test_batched import logits_of, make_problems

from subroutine_circuits.adapters import as_adapter, tl_unit_map
from subroutine_circuits.experiment.batched import fixed_mask_scores
from subroutine_circuits.experiment.config import MaskSearchConfig
from subroutine_circuits.experiment.converge import (
    Plateau,
    budget_steps,
    mask_schedule,
    train_masks_converged,
)
from subroutine_circuits.experiment.search import EncodedProblems, search_all, train_mask_run
from subroutine_circuits.masks.ablator import Ablator, reference_ablator
from subroutine_circuits.models import ooo_logits


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(seed=3)


def test_schedule_budget_and_temperature():
    """The budget comes from epochs; T reaches temp_max exactly at the budget's last step."""
    assert budget_steps(2.5, 30, 8) == 10  # ceil(2.5 * 30 / 8)
    cfg = MaskSearchConfig(epochs=3, batch_size=7, temp_max=150.0, patience=2)
    s = mask_schedule(cfg, 20)
    assert (s.steps, s.eval_every, s.patience) == (9, 3, 2)  # ceil(60/7); one eval per epoch
    assert s.temperature(s.steps) == pytest.approx(150.0, rel=1e-12)
    assert s.temperature(0) == 1.0 and 1 < s.temperature(4) < 150
    assert [t for t in range(1, 10) if s.evaluates_after(t)] == [3, 6, 9]
    assert mask_schedule(MaskSearchConfig(steps=5, eval_every=2), 1000).steps == 5
    with pytest.raises(ValueError, match="epochs"):
        budget_steps(0, 10, 2)


def test_plateau_rule():
    """Better = higher accuracy, or within tolerance and sufficiently sparser; patience counts
    evaluations without a new best."""
    p = Plateau(tolerance=0.02, patience=2, min_density_drop=0.01)
    assert p.update(0.90, 1.0, 1)  # first
    assert p.update(0.89, 0.5, 2)  # within tolerance, sparser
    assert not p.update(0.89, 0.495, 3)  # sparser by less than min_density_drop
    assert not p.update(0.80, 0.1, 4)  # too inaccurate
    assert p.stopped and (p.best_acc, p.best_density, p.best_step) == (0.89, 0.5, 2)
    assert p.update(0.95, 0.9, 5) and not p.stopped  # a new maximum always counts
    assert not Plateau(0.0, 0).stopped


def _two_datasets():
    train = [make_problems(24, 9, seed=1), make_problems(20, 9, seed=2, min_len=4)]
    val = [make_problems(12, 9, seed=3), make_problems(12, 9, seed=4)]
    ref = make_problems(16, 9, seed=5)
    return train, val, ref


@pytest.mark.parametrize("parametrization", ["hard_concrete", "continuous"])
def test_converged_batched_equals_separate_runs(model, parametrization):
    """K masks on two datasets in one loop == K separate runs: same steps, best step, val acc,
    binary mask; some masks stop early (dropped from the batch), others use the whole budget."""
    train, val, ref = _two_datasets()
    adapter = as_adapter(model, pool="last")
    um = tl_unit_map(model)
    abl = reference_ablator(adapter, um, ref.flat_inputs(), "mean")
    assert abl.position_aware
    cfg = MaskSearchConfig(
        parametrization=parametrization, steps=24, eval_every=3, patience=2, batch_size=5,
        lr=0.3, min_density_drop=0.0,
    )  # fmt: skip
    sched = mask_schedule(cfg, 24)
    hps = [{"l0_weight": 0.0}, {"l0_weight": 30.0}, {"l0_weight": 30.0}, {"l0_weight": 0.0}]
    seeds, which = [0, 1, 2, 3], [0, 0, 1, 1]
    got = train_masks_converged(
        model, train, val, cfg, hps, seeds, sched, abl, "last", data_index=which, noise="exact"
    )
    for hp, s, d, g in zip(hps, seeds, which, got):
        ref_run = train_mask_run(adapter, train[d], cfg, hp, s, val=val[d], ablator=abl,
                                 schedule=sched)  # fmt: skip
        assert (g.steps, g.best_step, g.stopped_early) == (
            ref_run.steps, ref_run.best_step, ref_run.stopped_early,
        )  # fmt: skip
        assert g.val_acc == pytest.approx(ref_run.val_acc)
        assert torch.equal(g.mask.flat_binary(), ref_run.mask.flat_binary())
        torch.testing.assert_close(logits_of(g.mask), logits_of(ref_run.mask), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
        assert [h[0] for h in g.history] == [h[0] for h in ref_run.history]
        if parametrization == "continuous":
            assert g.final_temp == pytest.approx(sched.temperature(g.steps))
    assert any(g.stopped_early for g in got) and not all(g.stopped_early for g in got)
    assert any(g.steps == sched.steps for g in got)
    full = [g for g in got if g.steps == sched.steps]
    if parametrization == "continuous":
        assert full[0].final_temp == pytest.approx(cfg.temp_max)


def test_search_all_engines_choose_the_same(model):
    """search_all: batched and separate engines choose the same point and the same masks."""
    train, val, ref = _two_datasets()
    adapter = as_adapter(model, pool="last")
    abl = reference_ablator(adapter, tl_unit_map(model), ref.flat_inputs(), "mean")
    cfg = MaskSearchConfig(steps=12, eval_every=4, patience=1, batch_size=6,
                           grid=[{"l0_weight": 0.5}, {"l0_weight": 6.0, "lr": 0.3}])  # fmt: skip
    tr, va = {"a": train[0], "b": train[1]}, {"a": val[0], "b": val[1]}
    a = search_all(adapter, tr, va, cfg, [0, 1], abl, engine="batched")
    b = search_all(adapter, tr, va, cfg, [0, 1], abl, engine="separate")
    for s in ("a", "b"):
        assert a[s].hp == b[s].hp
        assert [e["val_acc"] for e in a[s].log] == pytest.approx([e["val_acc"] for e in b[s].log])
        for m in (0, 1):
            assert torch.equal(a[s].runs[m].mask.flat_binary(), b[s].runs[m].mask.flat_binary())
    with pytest.raises(ValueError, match="unknown mask engine"):
        search_all(adapter, tr, va, cfg, [0], abl, engine="gpu")


def _hand_mean_logits(model, data: EncodedProblems, ref: EncodedProblems, keep, um):
    """OOO logits with removed units set to hand-computed position-aware means: every stimulus
    runs alone (no padding); means over the reference stimuli's last / other positions."""
    names = um.hook_names()
    sums = {n: [0.0, 0, 0.0, 0] for n in names}  # ro_sum, ro_count, other_sum, other_count
    rt, rl = ref.tokens.reshape(-1, ref.tokens.shape[-1]), ref.lengths.reshape(-1)
    with torch.no_grad():
        for t, n_tok in zip(rt, rl):
            _, cache = model.run_with_cache(t[None, : int(n_tok)], names_filter=names)
            for n in names:
                a = cache[n][0].double()
                sums[n][0] += a[-1]
                sums[n][1] += 1
                sums[n][2] += a[:-1].sum(0)
                sums[n][3] += a.shape[0] - 1
    means = {n: (v[0] / v[1], v[2] / v[3]) for n, v in sums.items()}
    removed = {}
    for off, g in zip(um.offsets(), um.groups):
        removed[g.hook_name] = ~keep[off : off + g.size]

    def hook(act, hook):
        ro, other = means[hook.name]
        act = act.clone()
        rm = removed[hook.name]
        act[:, :-1, rm] = other[rm].to(act.dtype)
        act[:, -1, rm] = ro[rm].to(act.dtype)
        return act

    out = []
    dt, dl = data.tokens.reshape(-1, data.tokens.shape[-1]), data.lengths.reshape(-1)
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, hook) for n in names]):
        for t, n_tok in zip(dt, dl):
            resid = model(t[None, : int(n_tok)], stop_at_layer=model.cfg.n_layers)
            out.append(model.ln_final(resid)[0, -1].double())
    x = torch.stack(out).view(len(data), 4, -1)
    x = x / x.norm(dim=-1, keepdim=True)
    gram = x @ x.transpose(1, 2)
    return -(gram.sum(-1) - gram.diagonal(dim1=1, dim2=2))


@pytest.mark.parametrize("max_rows", [40, 8192])
def test_position_aware_mean_equals_hand_hooks(model, max_rows):
    """fixed_mask_scores with the mean ablator == hand-written hooks with hand-made means (in
    passes of one mask over chunks of problems, the mean replacement reused across masks, or
    in one pass)."""
    train, val, ref = _two_datasets()
    um = tl_unit_map(model)
    abl = reference_ablator(as_adapter(model, pool="last"), um, ref.flat_inputs(), "mean")
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, um.n_units, generator=g) < torch.tensor([[0.2], [0.6], [0.0]])
    scores = fixed_mask_scores(model, val[0], keep, "last", unit_map=um, ablator=abl,
                               max_rows=max_rows)  # fmt: skip
    for i in range(3):
        hand = _hand_mean_logits(model, val[0], ref, keep[i], um)
        torch.testing.assert_close(scores[i].double(), hand, rtol=1e-4, atol=1e-4)
    # everything removed: the readout sees a constant plus its own token's embedding only
    plain = reference_ablator(as_adapter(model, pool="last"), um, ref.flat_inputs(), "mean",
                              position_aware=False)  # fmt: skip
    other = fixed_mask_scores(model, val[0], keep[2:], "last", unit_map=um, ablator=plain)
    assert not torch.allclose(other[0], scores[2])  # position-awareness changes the values


def test_resample_from_the_stimuli_themselves_is_the_clean_model(model):
    """Each stimulus resampled from itself (unique lengths): any mask leaves the outputs clean."""
    lens = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:12].view(3, 4) + 1
    toks = torch.randint(1, 50, (3, 4, 12), generator=torch.Generator().manual_seed(2))
    toks = toks * (torch.arange(12)[None, None, :] < lens[..., None])
    data = EncodedProblems({"tokens": toks, "lengths": lens}, torch.tensor([0, 1, 2]))
    um = tl_unit_map(model)
    abl = reference_ablator(as_adapter(model, pool="last"), um, data.flat_inputs(), "resample")
    keep = torch.rand(4, um.n_units, generator=torch.Generator().manual_seed(3)) < 0.3
    got = fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl)
    with torch.no_grad():
        clean = ooo_logits(model, data.tokens, data.lengths, "last")
    for i in range(4):
        torch.testing.assert_close(got[i], clean, rtol=1e-4, atol=1e-5)
    zero = fixed_mask_scores(model, data, keep[:1], "last", unit_map=um, ablator=Ablator("zero"))
    assert not torch.allclose(zero[0], clean, atol=1e-3)
    with pytest.raises(ValueError, match="unknown ablation"):
        Ablator("gaussian")
    assert math.isfinite(float(got.sum()))


@pytest.mark.parametrize("with_val", [True, False])
def test_single_mask_loop_refuses_a_non_finite_loss(model, with_val):
    """A loss that turns NaN at its third step stops the single-mask loop there, naming the
    step, with or without validation data."""
    from subroutine_circuits.objectives import OddOneOut

    class TurnsNaN(OddOneOut):
        calls = 0

        def loss(self, adapter, mask, batch):
            TurnsNaN.calls += 1
            out = super().loss(adapter, mask, batch)
            return out * float("nan") if TurnsNaN.calls >= 3 else out

    train, val, _ = _two_datasets()
    adapter = as_adapter(model, pool="last")
    cfg = MaskSearchConfig(steps=8, eval_every=4, patience=0, batch_size=5)
    with pytest.raises(ValueError, match="non-finite loss at step 2"):
        train_mask_run(adapter, train[0], cfg, {"l0_weight": 1.0}, 0,
                       val=val[0] if with_val else None, ablator=Ablator("zero"),
                       objective=TurnsNaN())  # fmt: skip
