"""Masks on inputs without tokens (images through the CNN adapter): batched fixed-mask scores
equal hand-written hooks with hand-computed channel means, the converged batched engine equals
separate ``train_mask_run`` calls, and token-only ablations are refused or left out."""

from __future__ import annotations

import pytest
import torch

from subroutine_circuits.adapters import as_adapter
from subroutine_circuits.adapters.base import EncodedProblems
from subroutine_circuits.experiment.batched import evaluate_fixed_masks, fixed_mask_scores
from subroutine_circuits.experiment.config import MaskSearchConfig
from subroutine_circuits.experiment.converge import mask_schedule, train_masks_converged
from subroutine_circuits.experiment.search import search_all, train_mask_run
from subroutine_circuits.masks.ablator import Ablator, reference_ablator
from subroutine_circuits.models.cnn import CNNConfig, HookedCNN


@pytest.fixture(scope="module")
def adapter():
    cfg = CNNConfig(
        image_size=12, stem_channels=4, stage_widths=(4, 6), stage_channels=(4, 6),
        stage_blocks=(1, 1), stage_strides=(1, 2), d_hidden=6, d_embed=5, seed=1,
    )  # fmt: skip
    return as_adapter(HookedCNN(cfg)).freeze()


def problems(n: int, seed: int) -> EncodedProblems:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 4, 3, 12, 12, generator=g)
    return EncodedProblems({"images": images}, torch.randint(0, 4, (n,), generator=g))


def hand_scores(adapter, data: EncodedProblems, keep: torch.Tensor, ref: EncodedProblems | None):
    """OOO logits with every removed unit replaced by hand: zero (``ref`` None) or the mean of
    its activation over the reference images and space, one mask at a time."""
    model, um = adapter.model, adapter.unit_map()
    means = {}
    if ref is not None:
        acts = {}
        hooks = [(g.hook_name, lambda x, hook: acts.__setitem__(hook.name, x)) for g in um.groups]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(ref.flat_inputs()["images"])
        for g in um.groups:
            x = acts[g.hook_name]
            means[g.hook_name] = x.mean(dim=[d for d in range(x.dim()) if d != 1])  # [units]
    out = []
    for row in keep:
        hooks = []
        for off, g in zip(um.offsets(), um.groups):
            k = row[off : off + g.size]

            def fn(x, hook, k=k, name=g.hook_name):
                shape = [1, -1] + [1] * (x.dim() - 2)
                v = means[name].view(shape) if ref is not None else torch.zeros(())
                return torch.where(k.view(shape), x, v)

            hooks.append((g.hook_name, fn))
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            out.append(adapter.ooo_logits(data.inputs))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_fixed_mask_scores_on_images_equal_hand_hooks(adapter, kind):
    data, ref = problems(7, 0), problems(5, 1)
    um = adapter.unit_map()
    keep = torch.rand(5, um.n_units, generator=torch.Generator().manual_seed(2)) > 0.4
    keep[0] = True  # the full model
    abl = reference_ablator(adapter, um, ref.flat_inputs(), kind)
    # max_rows 12: problems and masks in several chunks
    got = fixed_mask_scores(adapter.model, data, keep, unit_map=um, ablator=abl, max_rows=12,
                            adapter=adapter)  # fmt: skip
    want = hand_scores(adapter, data, keep, ref if kind == "mean" else None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if kind == "mean":  # the means matter: not the zero-ablated scores
        assert not torch.allclose(got[1:], hand_scores(adapter, data, keep[1:], None), atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(got[0], adapter.ooo_logits(data.inputs), rtol=1e-4, atol=1e-5)
    acc = evaluate_fixed_masks(adapter.model, data, keep, unit_map=um, ablator=abl,
                               adapter=adapter)  # fmt: skip
    assert acc.tolist() == pytest.approx((want.argmax(-1) == data.odd).double().mean(1).tolist())


def test_image_inputs_need_the_adapter_and_refuse_resample(adapter):
    data, um = problems(3, 0), adapter.unit_map()
    keep = torch.ones(1, um.n_units, dtype=torch.bool)
    with pytest.raises(ValueError, match="adapter="):
        fixed_mask_scores(adapter.model, data, keep, unit_map=um, ablator=Ablator("zero"))
    with pytest.raises(ValueError, match="resample ablation needs token inputs"):
        reference_ablator(adapter, um, data.flat_inputs(), "resample")


@pytest.mark.parametrize("rows", [10**6, 16, 32])
@pytest.mark.parametrize("parametrization", ["hard_concrete", "continuous"])
def test_converged_batched_equals_separate_runs_on_images(
    adapter, parametrization, rows, monkeypatch
):
    """The batched engine on images == separate train_mask_run calls (same checkpoints), in one
    forward pass per step or split into passes of one (16 images) or two masks (32 images)."""
    monkeypatch.setattr(adapter, "cpu_rows", rows)  # images per pass of the batched engine
    train, val = [problems(20, 3), problems(16, 4)], [problems(10, 5), problems(10, 6)]
    abl = reference_ablator(adapter, adapter.unit_map(), problems(8, 7).flat_inputs(), "mean")
    cfg = MaskSearchConfig(
        parametrization=parametrization, steps=12, eval_every=3, patience=2, batch_size=4,
        lr=0.3, min_density_drop=0.0, unit_kinds=("channel", "neuron"),
    )  # fmt: skip
    sched = mask_schedule(cfg, 20)
    hps = [{"l0_weight": 0.0}, {"l0_weight": 30.0}, {"l0_weight": 5.0}]
    seeds, which = [0, 1, 2], [0, 1, 1]
    got = train_masks_converged(adapter.model, train, val, cfg, hps, seeds, sched, abl,
                                data_index=which, noise="exact", adapter=adapter)  # fmt: skip
    for hp, s, d, g in zip(hps, seeds, which, got):
        ref = train_mask_run(adapter, train[d], cfg, hp, s, val=val[d], ablator=abl,
                             schedule=sched)  # fmt: skip
        assert (g.steps, g.best_step, g.stopped_early) == (
            ref.steps, ref.best_step, ref.stopped_early,
        )  # fmt: skip
        assert g.val_acc == pytest.approx(ref.val_acc)
        assert torch.equal(g.mask.flat_binary(), ref.mask.flat_binary())
        assert [h[1] for h in g.history] == pytest.approx([h[1] for h in ref.history])
    assert not all(g.mask.flat_binary().all() for g in got)  # something was learned away


def test_search_all_on_images_engines_agree(adapter):
    abl = reference_ablator(adapter, adapter.unit_map(), problems(8, 7).flat_inputs(), "mean")
    cfg = MaskSearchConfig(steps=6, eval_every=3, patience=1, batch_size=4, lr=0.3,
                           unit_kinds=("channel", "neuron"),
                           grid=[{"l0_weight": 0.5}, {"l0_weight": 20.0}])  # fmt: skip
    tr, va = {"a": problems(12, 8)}, {"a": problems(8, 9)}
    a = search_all(adapter, tr, va, cfg, [0, 1], abl, engine="batched")["a"]
    b = search_all(adapter, tr, va, cfg, [0, 1], abl, engine="separate")["a"]
    assert a.hp == b.hp
    for m in (0, 1):
        assert torch.equal(a.runs[m].mask.flat_binary(), b.runs[m].mask.flat_binary())
