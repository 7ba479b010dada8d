"""The join is exact: the joined model's block-A residual, heads and neurons equal part A's."""

from __future__ import annotations

import pytest
import torch

from subroutine_circuits.groundtruth.join import check_joinable, join_models, layout_of
from subroutine_circuits.groundtruth.prune import all_units, compact_part
from subroutine_circuits.models import ModelSpec, final_hidden, make_model


def _part(seed, d_model, n_heads, d_mlp, attention="causal", d_head=8, **kw):
    """A random part with non-zero biases everywhere (TL initialises biases to zero)."""
    spec = ModelSpec(
        "tiny", attention=attention, n_ctx=16, n_layers=2, d_model=d_model, n_heads=n_heads,
        d_head=d_head, d_mlp=d_mlp, normalization_type=kw.pop("normalization_type", None), **kw,
    )  # fmt: skip
    m = make_model(spec, vocab_size=30, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".b_" in name or name.endswith("b_U"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m.double()


def _run(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return cache


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_joined_blocks_equal_parts_exactly(attention):
    a = _part(0, 24, 3, 20, attention)
    b = _part(1, 16, 2, 12, attention)
    scale_a, scale_b = 0.6, 1.7
    joined = join_models(a, b, scale_a=scale_a, scale_b=scale_b).double()
    lay = layout_of(a, b)
    assert joined.cfg.d_model == 40 and joined.cfg.n_heads == 5 and joined.cfg.d_mlp == 32
    tokens = torch.randint(1, 30, (5, 9), generator=torch.Generator().manual_seed(3))
    cj, ca, cb = _run(joined, tokens), _run(a, tokens), _run(b, tokens)
    for layer in range(2):
        for hook, (ra, rb) in {
            f"blocks.{layer}.hook_resid_pre": (lay.resid("A"), lay.resid("B")),
            f"blocks.{layer}.hook_resid_mid": (lay.resid("A"), lay.resid("B")),
            f"blocks.{layer}.hook_resid_post": (lay.resid("A"), lay.resid("B")),
        }.items():
            torch.testing.assert_close(cj[hook][..., ra], scale_a * ca[hook], atol=1e-10, rtol=0)
            torch.testing.assert_close(cj[hook][..., rb], scale_b * cb[hook], atol=1e-10, rtol=0)
        z = f"blocks.{layer}.attn.hook_z"
        torch.testing.assert_close(cj[z][:, :, list(lay.heads("A"))], ca[z], atol=1e-10, rtol=0)
        torch.testing.assert_close(cj[z][:, :, list(lay.heads("B"))], cb[z], atol=1e-10, rtol=0)
        pat = f"blocks.{layer}.attn.hook_pattern"
        torch.testing.assert_close(cj[pat][:, : a.cfg.n_heads], ca[pat], atol=1e-10, rtol=0)
        post = f"blocks.{layer}.mlp.hook_post"
        torch.testing.assert_close(
            cj[post][..., list(lay.neurons("A"))], ca[post], atol=1e-10, rtol=0
        )
        torch.testing.assert_close(
            cj[post][..., list(lay.neurons("B"))], cb[post], atol=1e-10, rtol=0
        )
    # the OOO readout sees [scale_a * emb_A | scale_b * emb_B]
    lengths = torch.tensor([9, 7, 5, 9, 3])
    emb = final_hidden(joined, tokens, lengths)
    torch.testing.assert_close(emb[:, :24], scale_a * final_hidden(a, tokens, lengths))
    torch.testing.assert_close(emb[:, 24:], scale_b * final_hidden(b, tokens, lengths))
    # vocabulary logits: the sum of the parts'
    torch.testing.assert_close(joined(tokens), a(tokens) + b(tokens), atol=1e-9, rtol=0)


def test_join_float32_close_and_parts_untouched():
    a, b = _part(2, 16, 2, 8).float(), _part(3, 16, 2, 8).float()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    joined = join_models(a, b)
    tokens = torch.randint(1, 30, (4, 8), generator=torch.Generator().manual_seed(0))
    resid = joined(tokens, stop_at_layer=2)
    torch.testing.assert_close(resid[..., :16], a(tokens, stop_at_layer=2), atol=1e-5, rtol=1e-5)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])
    assert joined.sc_pool == "last"


def test_check_joinable_names_the_problem():
    a = _part(0, 16, 2, 8)
    with pytest.raises(ValueError, match="normalization_type"):
        check_joinable(_part(1, 16, 2, 8, normalization_type="LN"), a)
    with pytest.raises(ValueError, match="d_head"):
        check_joinable(a, _part(1, 16, 2, 8, d_head=4))
    with pytest.raises(ValueError, match="attention_dir"):
        check_joinable(a, _part(1, 16, 2, 8, attention="bidirectional"))
    with pytest.raises(ValueError, match="scale"):
        join_models(a, a, scale_a=0.0)


@pytest.mark.parametrize("keep_width", [False, True])
def test_compact_part_equals_zero_ablation(keep_width):
    m = _part(4, 16, 4, 10)
    keep = {(0, "head", 1), (0, "head", 3), (1, "head", 2), (0, "neuron", 0), (0, "neuron", 7)}
    keep |= {(1, "neuron", 4)}
    new, kept, mapping = compact_part(m, keep, keep_width=keep_width)
    new = new.double()
    assert len(kept) == len(keep) and set(mapping) == keep
    if not keep_width:
        assert new.cfg.n_heads == 2 and new.cfg.d_mlp == 2
    else:
        assert new.cfg.n_heads == 4 and kept == keep

    drop = set(all_units(m)) - keep

    def zero(kind, layer):
        idx = [i for (lay, k, i) in drop if lay == layer and k == kind]

        def fn(x, hook):
            x = x.clone()
            x[:, :, idx] = 0.0
            return x

        return fn

    hooks = [(f"blocks.{layer}.attn.hook_z", zero("head", layer)) for layer in range(2)]
    hooks += [(f"blocks.{layer}.mlp.hook_post", zero("neuron", layer)) for layer in range(2)]
    tokens = torch.randint(1, 30, (3, 7), generator=torch.Generator().manual_seed(1))
    want = m.run_with_hooks(tokens, fwd_hooks=hooks)
    torch.testing.assert_close(new(tokens), want, atol=1e-10, rtol=0)
    # units outside the kept set have exactly zero activations in the compacted part
    _, cache = new.run_with_cache(tokens)
    live = {(lay, k, i) for (lay, k, i) in kept}
    for lay, k, i in all_units(new):
        if (lay, k, i) in live:
            continue
        act = cache[f"blocks.{lay}.attn.hook_z"][:, :, i] if k == "head" else (
            cache[f"blocks.{lay}.mlp.hook_post"][:, :, i]
        )  # fmt: skip
        assert float(act.abs().max()) == 0.0
