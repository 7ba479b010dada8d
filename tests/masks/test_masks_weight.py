"""Weight masks: parameter swapping, equivalence with neuron ablation, reinit, gradients, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from subroutine_circuits.adapters import as_adapter
from subroutine_circuits.adapters.transformer_lens import weight_names
from subroutine_circuits.masks import MaskConfig, WeightMask, load_mask, save_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster single-threaded on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _maxdiff(a, b) -> float:
    return float((a - b).detach().abs().max())


def test_default_params_and_rejections(tiny_model):
    wm = WeightMask(tiny_model, None, weight_names(tiny_model))
    assert wm.param_names == [
        f"blocks.{layer}.{m}.{w}"
        for layer in range(2)
        for m, w in [
            ("attn", "W_Q"),
            ("attn", "W_O"),
            ("attn", "W_K"),
            ("attn", "W_V"),
            ("mlp", "W_in"),
            ("mlp", "W_out"),
        ]
    ]
    per_layer = 4 * 32 * 8 * 4 + 32 * 64 * 2
    assert wm.n_total == 2 * per_layer
    assert wm.flat_binary().shape == (2 * per_layer,)
    with pytest.raises(ValueError, match="'blocks.0.mlp.b_in' is a bias"):
        WeightMask(tiny_model, param_names=["blocks.0.mlp.b_in"])
    with pytest.raises(ValueError, match="'embed.W_E' is an embedding"):
        WeightMask(tiny_model, param_names=["embed.W_E"])
    with pytest.raises(ValueError, match="'unembed.W_U' is an embedding"):
        WeightMask(tiny_model, param_names=["unembed.W_U"])
    with pytest.raises(ValueError, match="'blocks.1.ln2.w' belongs to a LayerNorm"):
        WeightMask(tiny_model, param_names=["blocks.1.ln2.w"])
    with pytest.raises(ValueError, match="unknown parameter 'blocks.0.attn.W_X'"):
        WeightMask(tiny_model, param_names=["blocks.0.attn.W_X"])
    with pytest.raises(ValueError, match="weight masks support"):
        WeightMask(tiny_model, MaskConfig(ablation="mean"), weight_names(tiny_model))


@pytest.mark.parametrize(
    "cfg",
    [
        MaskConfig(parametrization="hard_concrete", init=10.0),
        MaskConfig(parametrization="continuous", init=10.0),
        MaskConfig(parametrization="hard_concrete", init=10.0, ablation="reinit"),
    ],
)
def test_all_ones_weight_mask_reproduces_logits(tiny_model, tiny_tokens, cfg):
    ref = tiny_model(tiny_tokens)
    originals = {n: p for n, p in tiny_model.named_parameters()}
    adapter = as_adapter(tiny_model)
    wm = WeightMask(tiny_model, cfg, adapter.weight_names(), init_std=adapter.init_std())
    wm.eval()
    assert wm.density() == 1.0
    with torch.no_grad(), wm.applied(tiny_model):
        assert not isinstance(tiny_model.blocks[0].attn.W_Q, torch.nn.Parameter)
        assert _maxdiff(tiny_model(tiny_tokens), ref) <= 1e-6
    # the very same Parameter objects are back
    for n, p in tiny_model.named_parameters():
        assert p is originals[n]
    fixed = WeightMask.fixed(
        tiny_model, torch.ones(wm.n_total, dtype=torch.bool), weight_names(tiny_model)
    )
    assert list(fixed.parameters()) == []
    with torch.no_grad(), fixed.applied(tiny_model):
        assert _maxdiff(tiny_model(tiny_tokens), ref) <= 1e-6


def test_masking_w_out_row_equals_zero_ablating_neuron(tiny_model, tiny_tokens):
    layer, neuron = 1, 13
    name = f"blocks.{layer}.mlp.W_out"
    wm_keep = torch.ones(64, 32, dtype=torch.bool)
    wm_keep[neuron] = False
    wm = WeightMask.fixed(tiny_model, wm_keep.reshape(-1), param_names=[name])

    def zero_neuron(x, hook):
        x = x.clone()
        x[:, :, neuron] = 0.0
        return x

    expected = tiny_model.run_with_hooks(
        tiny_tokens, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", zero_neuron)]
    )
    with torch.no_grad(), wm.applied(tiny_model):
        got = tiny_model(tiny_tokens)
    assert _maxdiff(got, expected) <= 1e-5
    assert _maxdiff(got, tiny_model(tiny_tokens)) > 1e-4
    # and masking head h's slice of W_O equals zero-ablating head h at hook_z
    wo = torch.ones(4, 8, 32, dtype=torch.bool)
    wo[2] = False
    wm2 = WeightMask.fixed(tiny_model, wo.reshape(-1), param_names=["blocks.0.attn.W_O"])

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 2] = 0.0
        return z

    expected2 = tiny_model.run_with_hooks(
        tiny_tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)]
    )
    with torch.no_grad(), wm2.applied(tiny_model):
        assert _maxdiff(tiny_model(tiny_tokens), expected2) <= 1e-5


def test_reinit_ablation_matches_weight_replacement(tiny_model, tiny_tokens):
    STD = tiny_model.cfg.initializer_range  # noqa: N806
    names = ["blocks.0.mlp.W_in", "blocks.1.attn.W_V"]
    wm = WeightMask(tiny_model, MaskConfig(ablation="reinit", seed=4), names, init_std=STD)
    std = tiny_model.cfg.initializer_range
    for n in names:
        r = wm.reinit_values[n]
        assert abs(float(r.std()) - std) < 0.15 * std and abs(float(r.mean())) < 0.2 * std
    # keep a random half of W_in and nothing of W_V; compare with an edited deep copy
    g = torch.Generator().manual_seed(0)
    keep_in = torch.rand(32, 64, generator=g) < 0.5
    keep_v = torch.zeros(4, 32, 8, dtype=torch.bool)
    flat = torch.cat([keep_in.reshape(-1), keep_v.reshape(-1)])
    fixed = WeightMask.fixed(
        tiny_model, flat, param_names=names, ablation="reinit", reinit=wm.reinit_values
    )
    edited = copy.deepcopy(tiny_model)
    with torch.no_grad():
        w_in = edited.blocks[0].mlp.W_in
        w_in.copy_(torch.where(keep_in, w_in, wm.reinit_values[names[0]]))
        edited.blocks[1].attn.W_V.copy_(wm.reinit_values[names[1]])
    expected = edited(tiny_tokens)
    with torch.no_grad(), fixed.applied(tiny_model):
        assert _maxdiff(tiny_model(tiny_tokens), expected) <= 1e-5
    # reinit values are reproducible from the seed
    again = WeightMask(tiny_model, MaskConfig(ablation="reinit", seed=4), names, init_std=STD)
    assert torch.equal(again.reinit_values[names[1]], wm.reinit_values[names[1]])
    with pytest.raises(ValueError, match="reinit values missing"):
        WeightMask(tiny_model, MaskConfig(ablation="reinit"), names, reinit={})


def test_gradients_reach_mask_only_and_restore_on_exception(tiny_model, tiny_tokens):
    assert all(p.requires_grad for p in tiny_model.parameters())  # not frozen on purpose
    wm = WeightMask(
        tiny_model, MaskConfig(parametrization="hard_concrete", init=1.0), weight_names(tiny_model)
    )
    wm.train()
    with wm.applied(tiny_model):
        for _ in range(2):  # two forward/backward passes in one block (fresh samples each)
            loss = tiny_model(tiny_tokens).pow(2).mean()
            loss.backward()
    for p in wm.parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    for n in wm.param_names:
        assert tiny_model.get_parameter(n).grad is None
    # parameters are restored even if the block raises
    before = tiny_model.blocks[0].attn.W_Q
    with pytest.raises(RuntimeError, match="boom"):
        with wm.applied(tiny_model):
            raise RuntimeError("boom")
    assert tiny_model.blocks[0].attn.W_Q is before
    assert isinstance(tiny_model.blocks[0].attn.W_Q, torch.nn.Parameter)


def test_nan_guard_names_parameter(tiny_model, tiny_tokens):
    wm = WeightMask(tiny_model, MaskConfig(parametrization="continuous"), weight_names(tiny_model))
    with torch.no_grad():
        wm.parts[5].logits[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.W_out.*NaN"):
        with wm.applied(tiny_model):
            pass
    assert isinstance(tiny_model.blocks[0].mlp.W_out, torch.nn.Parameter)


def test_weight_fixed_complement_random_save_load(tiny_model, tiny_tokens, tmp_path):
    wm = WeightMask(tiny_model, MaskConfig(init=2.0), param_names=["blocks.0.mlp.W_in"])
    with torch.no_grad():
        wm.parts[0].log_alpha[:, :10] = -4.0  # drop 10 of 64 columns
    wm.eval()
    flat = wm.flat_binary()
    assert int(flat.sum()) == 32 * 54
    assert abs(wm.density() - 54 / 64) < 1e-12
    st = wm.stats()
    assert st == [
        {
            "layer": 0,
            "kind": "W_in",
            "n": 2048,
            "kept": 1728,
            "expected_l0": pytest.approx(st[0]["expected_l0"]),
            "density": 1728 / 2048,
        }
    ]
    comp = wm.complement()
    assert torch.equal(comp.flat_binary(), ~flat)
    rnd = WeightMask.random_like(wm, seed=1)
    assert int(rnd.flat_binary().sum()) == 1728
    assert not torch.equal(rnd.flat_binary(), flat)
    # complement + original ablate disjoint weights: outputs differ from both full and each other
    path = tmp_path / "w.pt"
    save_mask(path, wm, tiny_model, meta={"note": "x"})
    back = load_mask(path, tiny_model)
    assert isinstance(back, WeightMask) and back.meta == {"note": "x"}
    assert torch.equal(back.flat_binary(), flat)
    with torch.no_grad():
        with wm.applied(tiny_model):
            a = tiny_model(tiny_tokens)
        with back.applied(tiny_model):
            b = tiny_model(tiny_tokens)
    assert _maxdiff(a, b) == 0.0
    from conftest import make_tiny_transformer

    other = make_tiny_transformer(d_vocab=60)
    with pytest.raises(ValueError, match="d_vocab=50, this model has d_vocab=60"):
        load_mask(path, other)


def test_weight_mask_on_custom_cnn_and_generator():
    from conftest import make_tiny_cnn

    cnn = make_tiny_cnn()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    ref = cnn(x)
    with pytest.raises(ValueError, match="'conv1.bias' is a bias"):
        WeightMask(cnn, param_names=["conv1.bias"])
    with pytest.raises(ValueError, match="init_std"):
        WeightMask(cnn, MaskConfig(ablation="reinit"), param_names=["conv2.weight"])
    keep = torch.ones(6, 5, 3, 3, dtype=torch.bool)
    keep[4, 2] = False  # kernel from input channel 2 to output channel 4
    wm = WeightMask.fixed(cnn, keep.reshape(-1), param_names=["conv2.weight"])
    edited = copy.deepcopy(cnn)
    with torch.no_grad():
        edited.conv2.weight[4, 2] = 0.0
    with torch.no_grad(), wm.applied(cnn):
        got = cnn(x)
    assert _maxdiff(got, edited(x)) <= 1e-6 and _maxdiff(got, ref) > 1e-5
    # an explicit torch.Generator makes hard-concrete samples reproducible
    a = WeightMask(
        cnn, MaskConfig(init=0.0), ["conv1.weight"], generator=torch.Generator().manual_seed(5)
    )
    b = WeightMask(
        cnn, MaskConfig(init=0.0), ["conv1.weight"], generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a.parts[0](), b.parts[0]())
    assert not torch.equal(a.parts[0](), a.parts[0]())  # a fresh sample each call


def test_fixed_like_and_instance_random_like(tiny_model, tiny_tokens, tmp_path):
    """The forms the experiment code uses: mask.fixed_like(...), mask.random_like(seed=...)."""
    names = ["blocks.0.mlp.W_out"]
    wm = WeightMask(
        tiny_model, MaskConfig(init=2.0, seed=3), names, init_std=tiny_model.cfg.initializer_range
    )
    with torch.no_grad():
        wm.parts[0].log_alpha[:5] = -4.0  # drop 5 rows = 5 neurons
    wm.eval()
    keep = wm.flat_binary()
    r_inst = wm.random_like(seed=2)
    r_cls = WeightMask.random_like(wm, 2)
    assert torch.equal(r_inst.flat_binary(), r_cls.flat_binary())
    assert int(r_inst.flat_binary().sum()) == int(keep.sum()) == 59 * 32
    sub = wm.fixed_like(keep)
    assert torch.equal(sub.flat_binary(), keep) and sub.ablation.value == "zero"
    abl = wm.fixed_like(~keep, ablation="reinit", seed=9)
    std = tiny_model.cfg.initializer_range
    r = abl.reinit_values[names[0]]
    assert abs(float(r.std()) - std) < 0.15 * std
    # ablating the 5 dropped rows with reinit = the model with those rows replaced
    edited = copy.deepcopy(tiny_model)
    with torch.no_grad():
        edited.blocks[0].mlp.W_out[5:] = r[5:]
    with torch.no_grad(), abl.applied(tiny_model):
        assert _maxdiff(tiny_model(tiny_tokens), edited(tiny_tokens)) <= 1e-5
    # init_std survives save/load, so a loaded mask can still make reinit variants
    save_mask(tmp_path / "w.pt", wm, tiny_model)
    back = load_mask(tmp_path / "w.pt")
    again = back.fixed_like(~keep, ablation="reinit", seed=9)
    assert torch.equal(again.reinit_values[names[0]], r)
