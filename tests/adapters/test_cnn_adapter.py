"""The CNN adapter: unit map, encoding, exact all-ones masks, no bypass, running from a layer,
mean-ablation reference, and channel patching (activation / attribution) against hand-written
hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from subroutine_circuits.adapters import CNNAdapter, as_adapter
from subroutine_circuits.masks import UnitMask
from subroutine_circuits.models.cnn import CNNConfig, HookedCNN, cnn_unit_groups
from subroutine_circuits.patching.activation import activation_patching
from subroutine_circuits.patching.attribution import attribution_patching, integrated_gradients
from subroutine_circuits.patching.circuits import PatchBatch, circuit_metrics


def tiny_cfg(block: str = "basic") -> CNNConfig:
    """A 3-stage CNN for 16 px images (seconds-free unit tests)."""
    return CNNConfig(
        image_size=16, stem_channels=6, block=block, stage_widths=(4, 6, 8),
        stage_channels=(6, 10, 12) if block == "bottleneck" else (6, 8, 8),
        stage_blocks=(1, 2, 1), stage_strides=(1, 2, 2), d_hidden=12, d_embed=5, seed=3,
    )  # fmt: skip


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["basic", "bottleneck"])
def adapter(request) -> CNNAdapter:
    return as_adapter(HookedCNN(tiny_cfg(request.param))).freeze()


def metric_against(ctx: torch.Tensor):
    """Oddness of an embedding among fixed (normalised) context embeddings."""
    ctx_sum = F.normalize(ctx, dim=-1).sum(0)

    def metric(emb: torch.Tensor) -> torch.Tensor:
        return -(F.normalize(emb, dim=-1) * ctx_sum).sum(-1)

    return metric


def test_as_adapter_and_unit_map(adapter):
    assert isinstance(adapter, CNNAdapter) and adapter.family == "cnn"
    groups = cnn_unit_groups(adapter.model)
    assert adapter.unit_map().groups == groups
    assert {g.kind for g in adapter.unit_map(kinds=["channel"]).groups} == {"channel"}
    assert adapter.unit_map(kinds=["neuron"]).groups == [groups[-1]]
    assert [g.layer for g in adapter.unit_map(layers=[0, groups[-1].layer]).groups] == [
        0, groups[-1].layer,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown unit kind 'head'"):
        adapter.unit_map(kinds=["head"])
    with pytest.raises(ValueError, match="not a unit layer"):
        adapter.unit_map(layers=[99])
    assert adapter.n_layers == len(groups)
    sig = adapter.signature()
    assert sig["model_class"] == "HookedCNN" and sig["stage_widths"] == [4, 6, 8]


def test_stage_selection_keeps_head_and_drops_stem():
    a = CNNAdapter(HookedCNN(tiny_cfg()), stages=[2])
    hooks = a.unit_map().hook_names()
    assert hooks == ["stages.2.blocks.0.hook_hidden", "head.hook_hidden"]
    assert "stem.conv.weight" not in a.weight_names()


def test_encode_problems_from_image_problems():
    from subroutine_circuits.tasks.vision import vision_task

    probs = vision_task("number_contact", image_size=32).make_problems("composite", 3, seed=1)
    a = as_adapter(HookedCNN("cpu"))
    enc = a.encode_problems(probs)
    assert enc.inputs["images"].shape == (3, 4, 3, 32, 32)
    assert torch.equal(enc.odd, torch.as_tensor(probs.odd))
    # uint8 arrays [h, w, 3] encode to the same tensors
    flat = a.encode_stimuli(list(probs.images.reshape(-1, 32, 32, 3)))["images"]
    assert torch.equal(flat, enc.inputs["images"].reshape(-1, 3, 32, 32))
    with pytest.raises(ValueError, match="empty"):
        a.encode_problems(probs.subset(slice(0, 0)))


def test_all_ones_channel_mask_is_exact(adapter):
    x = images(8).view(2, 4, 3, 16, 16)
    ref = adapter.ooo_logits({"images": x})
    for ablation in ("zero", "mean"):
        mask = UnitMask.fixed(
            adapter.unit_map(), torch.ones(adapter.unit_map().n_units, dtype=torch.bool), ablation
        )
        if ablation == "mean":
            mask.set_mean(adapter, {"images": images(10, seed=5)})
        with mask.applied(adapter.model):
            out = adapter.ooo_logits({"images": x})
        assert torch.equal(out, ref)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_no_bypass_everything_ablated(adapter, ablation):
    """With every channel and head neuron ablated, every input gives the same embedding."""
    um = adapter.unit_map()
    mask = UnitMask.fixed(um, torch.zeros(um.n_units, dtype=torch.bool), ablation)
    if ablation == "mean":
        mask.set_mean(adapter, {"images": images(10, seed=5)})
    with mask.applied(adapter.model), torch.no_grad():
        emb = adapter.embed({"images": images(6, seed=1) * 3})
    assert (emb - emb[0]).abs().max() < 1e-5
    # removing only the head's neurons cuts every path too (the second, complete cut)
    head = adapter.unit_map(kinds=["neuron"])
    mask = UnitMask.fixed(head, torch.zeros(head.n_units, dtype=torch.bool), "zero")
    with mask.applied(adapter.model), torch.no_grad():
        emb = adapter.embed({"images": images(6, seed=1)})
    assert (emb - emb[0]).abs().max() < 1e-6


def test_record_activations_is_the_spatial_mean(adapter):
    x = images(7)
    hooks = adapter.unit_map().hook_names()
    adapter.batch_size = 3  # several batches
    rec = adapter.record_activations({"images": x}, hooks)
    assert rec.readout_mask is None and rec.pos_mask is None
    _, cache = adapter.model.run_with_cache(x)
    for h in hooks:
        want = cache[h].mean(dim=(2, 3), keepdim=True) if cache[h].ndim == 4 else cache[h]
        torch.testing.assert_close(rec.acts[h], want, rtol=1e-5, atol=1e-6)
    # the mean-ablation values equal the mean over images and space of the full activations
    um = adapter.unit_map()
    mask = UnitMask.fixed(um, torch.zeros(um.n_units, dtype=torch.bool), "mean")
    mask.set_mean(adapter, {"images": x})
    for g in adapter.unit_map().groups:
        dims = [d for d in range(cache[g.hook_name].ndim) if d != 1]
        want = cache[g.hook_name].mean(dim=dims)
        torch.testing.assert_close(mask.ablation_values[g.hook_name].flatten(), want)


def test_accuracy_passes_at_most_cpu_rows_images(adapter, monkeypatch):
    """On the CPU ``accuracy`` caps every pass at ``cpu_rows`` images, whatever batch size is
    asked for; the accuracy equals one computed problem by problem by hand."""
    from subroutine_circuits.adapters.base import EncodedProblems

    g = torch.Generator().manual_seed(4)
    data = EncodedProblems({"images": torch.randn(9, 4, 3, 16, 16, generator=g)},
                           torch.randint(0, 4, (9,), generator=g))  # fmt: skip
    with torch.no_grad():
        want = (
            sum(
                int(adapter.ooo_logits({"images": data.inputs["images"][i : i + 1]}).argmax())
                == int(data.odd[i])
                for i in range(9)
            )
            / 9
        )
    sizes = []
    embed = adapter.embed
    monkeypatch.setattr(adapter, "embed", lambda x: sizes.append(len(x["images"])) or embed(x))
    monkeypatch.setattr(adapter, "cpu_rows", 8)  # two problems of 4 images per pass
    assert adapter.accuracy(data) == adapter.accuracy(data, batch_size=256) == want
    assert max(sizes) == 8 and sum(sizes) == 2 * 36
    assert adapter.accuracy(data, batch_size=1) == want and min(sizes) == 4
    with pytest.raises(ValueError, match="batch_size"):
        adapter.accuracy(data, batch_size=0)


def test_run_from_every_layer_reproduces_the_output(adapter):
    x = images(5)
    readout = adapter.readout("embed")
    states, acts, out = adapter.layer_states(x, adapter.unit_map().hook_names(), readout)
    with torch.no_grad():
        ref = adapter.model(x)
    torch.testing.assert_close(out, ref)
    assert len(states) == adapter.n_layers and set(acts) == set(adapter.unit_map().hook_names())
    for layer in range(adapter.n_layers):
        with torch.no_grad():
            torch.testing.assert_close(adapter.run_from_layer(states[layer], layer, readout), ref)


def _hand_patch(adapter, clean, corr, metric, name, unit) -> float:
    """Mean metric of the corrupted run with ``unit`` of hook ``name`` set to its clean value."""
    _, cache = adapter.model.run_with_cache(clean)

    def patch(act, hook):
        act = act.clone()
        act[:, unit] = cache[name][:, unit]
        return act

    with torch.no_grad():
        out = adapter.model.run_with_hooks(corr, fwd_hooks=[(name, patch)])
    return float(metric(out).mean())


def test_channel_activation_patching_equals_a_hand_written_hook(adapter):
    clean, corr = images(4, seed=1), images(4, seed=2)
    metric = metric_against(adapter.model(images(3, seed=9)).detach())
    groups = adapter.unit_map().groups
    res = activation_patching(adapter, clean, corr, metric, groups, readout="embed", chunk_rows=7)
    assert res.extra["path"] == "generic"
    with torch.no_grad():
        m_corr = float(metric(adapter.model(corr)).mean())
    assert res.corr_metric == pytest.approx(m_corr, abs=1e-6)
    for g in (groups[0], groups[2], groups[-1]):
        for u in range(g.size):
            want = _hand_patch(adapter, clean, corr, metric, g.hook_name, u)
            assert float(res.patched[g.hook_name][u]) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="per-position"):
        activation_patching(adapter, clean, corr, metric, groups, per_position=True,
                            readout="embed")  # fmt: skip


def test_channel_attribution_equals_a_hand_written_gradient(adapter):
    clean, corr = images(4, seed=1), images(4, seed=2)
    metric = metric_against(adapter.model(images(3, seed=9)).detach())
    g = adapter.unit_map().groups[1]
    res = attribution_patching(adapter, clean, corr, metric, [g], readout="embed")
    _, cache = adapter.model.run_with_cache(clean)
    held = {}

    def grab(act, hook):
        act = act.detach().requires_grad_(True)
        held["a"] = act
        return act

    with torch.enable_grad():
        out = adapter.model.run_with_hooks(corr, fwd_hooks=[(g.hook_name, grab)])
        m = metric(out).mean()
        (grad,) = torch.autograd.grad(m, [held["a"]])
    delta = cache[g.hook_name] - held["a"].detach()
    want = float(m.detach()) + (delta * grad).sum(dim=(0, 2, 3))
    torch.testing.assert_close(res.patched[g.hook_name], want, rtol=1e-4, atol=1e-6)
    # integrated gradients is complete: the units of a hook point add up to patching it whole
    ig = integrated_gradients(adapter, clean, corr, metric, [g], readout="embed", steps=1024)
    _, clean_cache = adapter.model.run_with_cache(clean)
    with torch.no_grad():
        whole = adapter.model.run_with_hooks(
            corr, fwd_hooks=[(g.hook_name, lambda a, hook: clean_cache[g.hook_name])]
        )
    total = float(ig.patched[g.hook_name].sum() - (g.size - 1) * ig.corr_metric)
    assert total == pytest.approx(float(metric(whole).mean()), abs=1e-3)


def test_circuit_metrics_on_channels_match_a_fixed_mask(adapter):
    clean, corr = images(4, seed=1), images(4, seed=2)
    metric = metric_against(adapter.model(images(3, seed=9)).detach())
    um = adapter.unit_map()
    keeps = torch.rand(3, um.n_units, generator=torch.Generator().manual_seed(0)) < 0.5
    got = circuit_metrics(adapter, PatchBatch(clean, corr, metric), um.groups, keeps, "zero",
                          "embed")  # fmt: skip
    for i in range(3):
        mask = UnitMask.fixed(um, keeps[i], "zero")
        with mask.applied(adapter.model), torch.no_grad():
            want = float(metric(adapter.model(clean)).mean())
        assert float(got[i]) == pytest.approx(want, abs=1e-5)


def test_reinit_changes_weights_deterministically():
    a, b = HookedCNN(tiny_cfg()), HookedCNN(tiny_cfg())
    as_adapter(a).reinit(7)
    as_adapter(b).reinit(7)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    w0 = HookedCNN(tiny_cfg()).stem.conv.weight
    assert not torch.equal(a.stem.conv.weight, w0)
    vals = as_adapter(a).reinit_values(["stem.conv.weight"], seed=1)
    assert vals["stem.conv.weight"].shape == w0.shape
    assert np.isfinite(vals["stem.conv.weight"].numpy()).all()


def test_bad_inputs_are_named():
    a = as_adapter(HookedCNN(tiny_cfg()))
    with pytest.raises(ValueError, match="'images'"):
        a.embed({"tokens": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="uint8"):
        a.encode_stimuli([np.zeros((16, 16, 3), np.float32)])
    with pytest.raises(ValueError, match="HookedCNN"):
        CNNAdapter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown readout"):
        a.readout("logits")
