"""HookedCNN: architecture, hooks, unit/weight masks (exactness, ablation, bypass), init."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from subroutine_circuits.adapters import as_adapter
from subroutine_circuits.masks import MaskConfig, UnitMap, UnitMask, WeightMask
from subroutine_circuits.models.cnn import (
    CNN_PRESETS,
    CNNConfig,
    HookedCNN,
    cnn_config,
    cnn_layer_table,
    cnn_reinit_values,
    cnn_unit_groups,
    cnn_weight_names,
    count_params,
    reinit_cnn,
)
from subroutine_circuits.models.readout import ooo_scores


def tiny_cfg(block: str = "basic", **kw) -> CNNConfig:
    """A 3-stage CNN small enough for unit tests (16 px images)."""
    base = dict(
        image_size=16,
        stem_channels=6,
        block=block,
        stage_widths=(4, 6, 8),
        stage_channels=(6, 10, 12) if block == "bottleneck" else (6, 8, 8),
        stage_blocks=(1, 2, 1),
        stage_strides=(1, 2, 2),
        d_hidden=12,
        d_embed=5,
    )
    base.update(kw)
    return CNNConfig(**base)


def images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(params=["basic", "bottleneck"])
def model(request) -> HookedCNN:
    return HookedCNN(tiny_cfg(request.param), seed=3)


# ---------------------------------------------------------------------- architecture
def test_cpu_preset_param_count_by_hand():
    """The cpu preset's parameter count, computed by hand from the layer shapes."""
    c = CNN_PRESETS["cpu"]
    total = 3 * 16 * 9  # stem conv
    c_in = c["stem_channels"]
    for w, c_out, s in zip(c["stage_widths"], c["stage_channels"], c["stage_strides"]):
        total += c_in * w * 9 + w * c_out * 9
        if s != 1 or c_in != c_out:
            total += c_in * c_out  # 1x1 shortcut
        c_in = c_out
    total += c_in * 128 + 128 + 128 * 64 + 64  # head
    assert count_params("cpu") == total == HookedCNN("cpu").n_params
    assert 150_000 < total < 190_000  # "~170k"


def test_resnet50_trunk_matches_torchvision_counts():
    """torchvision's published totals (resnet50: 25,557,032; wide_resnet50_2: 68,883,240)
    minus their fc (2048*1000+1000) and BatchNorm affine parameters (2 per BN channel) equal our
    conv trunk (InstanceNorm has no parameters)."""
    head = 2048 * 2048 + 2048 + 2048 * 128 + 128
    # BN channels: stem 64, per bottleneck 2*width + out, shortcut BNs 256+512+1024+2048
    for preset, tv_total in (("resnet50", 25_557_032), ("wide_resnet50", 68_883_240)):
        cfg = cnn_config(preset)
        bn = 64 + (256 + 512 + 1024 + 2048)
        for w, out, nb in zip(cfg.stage_widths, cfg.stage_channels, cfg.stage_blocks):
            bn += nb * (2 * w + out)
        assert count_params(preset) - head == tv_total - 2_049_000 - 2 * bn


def test_hooks_and_shapes_cpu_preset():
    m = HookedCNN("cpu")
    x = images(2, 32)
    emb, cache = m.run_with_cache(x)
    assert emb.shape == (2, 64)
    side = {0: 32, 1: 16, 2: 8, 3: 4}
    chans = {0: 16, 1: 32, 2: 64, 3: 64}
    assert cache["stem.hook_post"].shape == (2, 16, 32, 32)
    for s in range(4):
        for suf in ("hook_hidden", "hook_out"):
            assert cache[f"stages.{s}.blocks.0.{suf}"].shape == (2, chans[s], side[s], side[s])
    assert cache["hook_pooled"].shape == (2, 64)
    assert cache["head.hook_hidden"].shape == (2, 128)
    assert torch.equal(cache["hook_embed"], emb)
    # the pooled stream is the spatial mean of the last block output
    assert torch.allclose(cache["hook_pooled"], cache["stages.3.blocks.0.hook_out"].mean((2, 3)))


def test_bottleneck_hooks_and_resnet50_shapes_on_meta():
    m = HookedCNN(tiny_cfg("bottleneck"))
    _, cache = m.run_with_cache(images(2))
    assert cache["stages.1.blocks.0.hook_hidden"].shape == (2, 6, 16, 16)  # before the stride
    assert cache["stages.1.blocks.0.hook_hidden2"].shape == (2, 6, 8, 8)
    assert cache["stages.1.blocks.1.hook_out"].shape == (2, 10, 8, 8)
    with torch.device("meta"):
        big = HookedCNN(cnn_config("resnet50", device="meta"))
        _, cache = big.run_with_cache(torch.empty(1, 3, 128, 128))
    assert cache["stem.hook_post"].shape == (1, 64, 64, 64)
    assert cache["stages.0.blocks.2.hook_out"].shape == (1, 256, 32, 32)
    assert cache["stages.3.blocks.2.hook_hidden2"].shape == (1, 512, 4, 4)
    assert cache["hook_embed"].shape == (1, 128)


def test_instance_norm_no_params_and_mode_independent(model):
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and all(not n.affine and not n.track_running_stats for n in norms)
    x = images()
    model.train()
    a = model(x)
    model.eval()
    assert torch.equal(a, model(x))


def test_instance_norm_equals_torch_instance_norm():
    """The group-norm implementation of the instance norm is torch's instance norm (forward
    and the input gradient), per image and channel over space."""
    from subroutine_circuits.models.cnn import InstanceNorm

    norm = InstanceNorm(5, eps=1e-5, affine=False, track_running_stats=False)
    x = torch.randn(3, 5, 7, 6, generator=torch.Generator().manual_seed(0)) * 4 + 2
    x.requires_grad_(True)
    y = norm(x)
    want = F.instance_norm(x, eps=1e-5)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    by_hand = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(
        x.var((2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-5)
    w = torch.randn(3, 5, 7, 6, generator=torch.Generator().manual_seed(1))
    (ga,) = torch.autograd.grad((y * w).sum(), x)
    (gb,) = torch.autograd.grad((want * w).sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
    assert norm.state_dict() == {} and not list(norm.parameters())


def test_ooo_scores_match_hand_computation(model):
    probs = images(12).view(3, 4, 3, 16, 16)
    got = model.ooo_scores(probs).detach()
    emb = model.embed(probs.reshape(12, 3, 16, 16)).view(3, 4, -1).detach()
    assert torch.allclose(got, ooo_scores(emb))
    e = F.normalize(emb, dim=-1)
    for b in range(3):
        for i in range(4):
            want = -sum(float(e[b, i] @ e[b, j]) for j in range(4) if j != i)
            assert abs(float(got[b, i]) - want) < 1e-5


def test_bad_input_errors():
    m = HookedCNN(tiny_cfg())
    with pytest.raises(ValueError, match="4-d"):
        m(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        m(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="too small"):
        m(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="float"):
        m(torch.zeros(2, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="5-d"):
        m.ooo_scores(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown CNN preset"):
        HookedCNN("resnet18")
    with pytest.raises(ValueError, match="stage_channels has 2 entries"):
        CNNConfig(stage_widths=(4, 4, 4), stage_channels=(4, 4))
    with pytest.raises(ValueError, match="block must be"):
        CNNConfig(block="dense")
    with pytest.raises(ValueError, match="unknown CNNConfig field"):
        cnn_config("cpu", n_layers=3)
    with pytest.raises(ValueError, match="stage 5 out of range"):
        cnn_unit_groups(m, stages=[5])
    with pytest.raises(ValueError, match="expected a HookedCNN"):
        cnn_weight_names(torch.nn.Linear(2, 2))


def test_config_roundtrip():
    cfg = cnn_config("cpu_wide", seed=4)
    assert CNNConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------- init
def test_reinit_seeded_kaiming():
    m = HookedCNN(cnn_config("cpu", seed=0))
    w = m.stages[2].blocks[0].conv2.weight  # [64, 64, 3, 3], fan_out = 64 * 9
    assert abs(float(w.detach().std()) - (2 / (64 * 9)) ** 0.5) < 0.004
    assert float(m.head.fc_hidden.bias.detach().abs().max()) == 0.0
    a = {k: v.clone() for k, v in m.state_dict().items()}
    reinit_cnn(m, 1)
    assert any(not torch.equal(a[k], v) for k, v in m.state_dict().items())
    reinit_cnn(m, 0)
    assert all(torch.equal(a[k], v) for k, v in m.state_dict().items())


def test_reset_head_changes_only_head():
    m = HookedCNN(tiny_cfg())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.reset_head(seed=9)
    for k, v in m.state_dict().items():
        assert torch.equal(before[k], v) == (not k.startswith("head.") or k.endswith("bias"))


# ---------------------------------------------------------------------- unit maps
def test_unit_groups_layout(model):
    groups = cnn_unit_groups(model)
    table = cnn_layer_table(model)
    assert [g.hook_name for g in groups] == [r["hook_name"] for r in table]
    assert [g.layer for g in groups] == list(range(len(groups)))
    assert groups[0].hook_name == "stem.hook_post" and groups[0].kind == "channel"
    assert groups[-1].hook_name == "head.hook_hidden" and groups[-1].kind == "neuron"
    assert all(g.axis == 1 for g in groups)
    assert not any(g.hook_name.endswith("hook_out") for g in groups)  # the stream is not units
    n_hidden = 2 if model.cfg.block == "bottleneck" else 1
    assert len(groups) == 2 + n_hidden * sum(model.cfg.stage_blocks)
    _, cache = model.run_with_cache(images(2))
    for g in groups:
        assert cache[g.hook_name].shape[1] == g.size
    sub = cnn_unit_groups(model, stages=[1, 2])
    assert sub[0].hook_name.startswith("stages.1.") and sub[-1].hook_name == "head.hook_hidden"
    # ordinals are absolute depth, independent of the selection
    assert {g.hook_name: g.layer for g in sub}.items() <= {
        g.hook_name: g.layer for g in groups
    }.items()
    assert cnn_unit_groups(model, include_head=False)[-1].kind == "channel"
    UnitMap(groups).validate(model)


def test_weight_names(model):
    names = cnn_weight_names(model)
    params = dict(model.named_parameters())
    assert names[0] == "stem.conv.weight" and names[-2:] == [
        "head.fc_hidden.weight",
        "head.fc_out.weight",
    ]
    assert all(n.endswith(".weight") and n in params for n in names)
    convs = [n for n, p in params.items() if p.dim() == 4]
    assert sorted(convs) == sorted(n for n in names if not n.startswith("head."))
    assert "stages.1.blocks.0.shortcut.conv.weight" in names  # downsample convs included
    sub = cnn_weight_names(model, stages=[2])
    assert all(n.startswith(("stages.2.", "head.")) for n in sub)
    WeightMask(model, MaskConfig(), names)  # accepted by the engine (no bias/norm rejection)


# ---------------------------------------------------------------------- masks: exactness
def test_all_ones_unit_mask_reproduces_output_exactly(model):
    x, ref_x = images(5, seed=1), images(7, seed=2)
    um = UnitMap(cnn_unit_groups(model))
    ref = model(x)
    ones = torch.ones(um.n_units, dtype=torch.bool)
    with torch.no_grad():
        for abl in ("zero", "mean"):
            mask = UnitMask.fixed(um, ones, abl)
            if abl == "mean":
                mask.set_mean(as_adapter(model), ref_x)
            with mask.applied(model):
                assert torch.equal(model(x), ref)
    trainable = UnitMask(um, MaskConfig(parametrization="continuous", init=5.0)).eval()
    with torch.no_grad(), trainable.applied(model):
        assert torch.equal(model(x), ref)


def test_all_ones_weight_mask_reproduces_output_exactly(model):
    x = images(5, seed=1)
    ref = model(x)
    names = cnn_weight_names(model)
    wm = WeightMask.fixed(model, torch.ones(WeightMask(model, None, names).n_total).bool(), names)
    with torch.no_grad(), wm.applied(model):
        assert torch.equal(model(x), ref)
    assert torch.equal(model(x), ref)  # parameters restored


def test_channel_zero_and_mean_ablation_equal_hand_hooks(model):
    x, ref_x = images(5, seed=1), images(9, seed=2)
    um = UnitMap(cnn_unit_groups(model))
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(um.n_units, generator=g) < 0.6
    pieces = dict(zip(um.hook_names(), torch.split(keep, [gr.size for gr in um.groups])))
    _, cache = model.run_with_cache(ref_x)

    def hand(mode):
        def hook(act, hook):
            k = pieces[hook.name]
            out = act.clone()
            if mode == "zero":
                out[:, ~k] = 0.0
            else:  # mean over batch (and space) of the reference run, per channel / neuron
                ref = cache[hook.name]
                mean = ref.mean(dim=[d for d in range(ref.dim()) if d != 1])
                out[:, ~k] = mean[~k].view(-1, *([1] * (act.dim() - 2)))
            return out

        return [(name, hook) for name in pieces]

    with torch.no_grad():
        for abl in ("zero", "mean"):
            want = model.run_with_hooks(x, fwd_hooks=hand(abl))
            mask = UnitMask.fixed(um, keep, abl)
            if abl == "mean":
                mask.set_mean(as_adapter(model), ref_x)
            with mask.applied(model):
                got = model(x)
            assert torch.allclose(got, want, atol=1e-6), abl
            assert not torch.allclose(got, model(x), atol=1e-3)  # the ablation did something


def test_hidden_channel_zero_ablation_equals_zeroing_its_conv_kernel():
    """Unit and weight masks agree: a hidden channel is conv1 -> norm -> ReLU, so zeroing all of
    conv1's kernel for output channel c (weight mask) equals zero-ablating channel c (unit)."""
    m = HookedCNN(tiny_cfg(), seed=5)
    x = images(4, seed=3)
    hook = "stages.1.blocks.1.hook_hidden"
    um = UnitMap([gr for gr in cnn_unit_groups(m) if gr.hook_name == hook])
    keep = torch.ones(um.n_units, dtype=torch.bool)
    keep[[1, 4]] = False
    name = "stages.1.blocks.1.conv1.weight"
    w_keep = torch.ones_like(m.get_parameter(name), dtype=torch.bool)
    w_keep[[1, 4]] = False
    with torch.no_grad():
        with UnitMask.fixed(um, keep).applied(m):
            a = m(x)
        with WeightMask.fixed(m, w_keep.reshape(-1), [name]).applied(m):
            b = m(x)
        # and an edited deep copy, independent of both engines
        m2 = copy.deepcopy(m)
        m2.get_parameter(name)[[1, 4]] = 0.0
        c = m2(x)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_reinit_values_for_weight_masks():
    m = HookedCNN(tiny_cfg())
    names = cnn_weight_names(m)
    vals = cnn_reinit_values(m, names, seed=1)
    assert all(vals[n].shape == m.get_parameter(n).shape for n in names)
    wm = WeightMask(m, MaskConfig(ablation="reinit"), names, reinit=vals)
    zero = WeightMask.fixed(m, torch.zeros(wm.n_total).bool(), names, "reinit", reinit=vals)
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        for n in names:
            m2.get_parameter(n).copy_(vals[n])
        with zero.applied(m):
            assert torch.allclose(m(images(3)), m2(images(3)), atol=1e-6)
    with pytest.raises(ValueError, match="unknown parameter"):
        cnn_reinit_values(m, ["head.nope.weight"])


# ---------------------------------------------------------------------- bypass
def _spread(t: torch.Tensor) -> float:
    """Largest difference between any item of a batch and the first."""
    return float((t - t[:1]).detach().abs().max())


@pytest.mark.parametrize("abl", ["zero", "mean"])
def test_everything_ablated_output_is_input_independent(model, abl):
    x = images(6, seed=4) * 3.0  # very different inputs
    ref_x = images(8, seed=5)

    def run(groups):
        um = UnitMap(groups)
        mask = UnitMask.fixed(um, torch.zeros(um.n_units, dtype=torch.bool), abl)
        if abl == "mean":
            mask.set_mean(as_adapter(model), ref_x)
        with torch.no_grad(), mask.applied(model):
            return model.run_with_cache(x)

    assert _spread(model(x)) > 1e-3  # unmasked: the input matters
    emb, _ = run(cnn_unit_groups(model))
    assert _spread(emb) < 1e-6
    # without the head's neurons: the stem and hidden channels alone cut every path, including
    # the 1x1 shortcut convs (they read the block input, which comes from masked channels)
    emb, cache = run(cnn_unit_groups(model, include_head=False))
    assert _spread(cache["hook_pooled"]) < 1e-6 and _spread(emb) < 1e-6
    for name, act in cache.items():
        if name.endswith("hook_out"):
            assert _spread(act) < 1e-5, name
    # negative controls: leave the stem out -> the stream carries the input to the head
    _, cache = run(cnn_unit_groups(model, include_stem=False, include_head=False))
    assert _spread(cache["hook_pooled"]) > 1e-3
    # only the last stage: the shortcut carries the input past it; the head neurons cut it
    last = [model.cfg.n_stages - 1]
    _, cache = run(cnn_unit_groups(model, stages=last, include_head=False))
    assert _spread(cache["hook_pooled"]) > 1e-3
    emb, _ = run(cnn_unit_groups(model, stages=last))
    assert _spread(emb) < 1e-6


def test_all_weights_zeroed_output_is_input_independent(model):
    x = images(6, seed=4) * 3.0
    names = cnn_weight_names(model, include_head=False)  # every conv kernel, no head
    wm = WeightMask.fixed(model, torch.zeros(WeightMask(model, None, names).n_total).bool(), names)
    with torch.no_grad(), wm.applied(model):
        _, cache = model.run_with_cache(x)
    assert _spread(cache["hook_pooled"]) < 1e-6


def test_save_load_roundtrip(tmp_path, model):
    from subroutine_circuits.models.cnn import load_cnn, save_cnn

    x = images(3)
    save_cnn(tmp_path / "ck", model, meta={"task": "toy", "val_acc": 0.5})
    back, meta = load_cnn(tmp_path / "ck")
    assert meta == {"task": "toy", "val_acc": 0.5}
    assert back.cfg == model.cfg and torch.equal(back(x), model(x))
    with pytest.raises(ValueError, match="config.json missing"):
        load_cnn(tmp_path / "nothing")


def test_trainable_masks_get_gradients_model_does_not(model):
    x = images(4)
    um = UnitMask(UnitMap(cnn_unit_groups(model)), MaskConfig(parametrization="continuous"))
    wm = WeightMask(model, MaskConfig(parametrization="continuous"), cnn_weight_names(model))
    for mask in (um, wm):
        mask.train()
        with mask.applied(model):
            model(x).pow(2).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mask.parameters())
    # unit masks leave weights in the graph; weight masks detach them
    model.zero_grad(set_to_none=True)
    with wm.applied(model):
        model(x).pow(2).sum().backward()
    assert all(model.get_parameter(n).grad is None for n in cnn_weight_names(model))
