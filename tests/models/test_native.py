"""NativeTransformer: this library's HookedTransformer-compatible model (TransformerLens 4.x).

Checked against independent computations: a plain-torch forward written here from the
transformer's definition (both versions), and TransformerLens 3.9's own ``HookedTransformer``
with the same seed (3.x only).
"""

from __future__ import annotations

import math

import pytest
import torch

from subroutine_circuits.models.native import NativeConfig, NativeTransformer
from subroutine_circuits.models.presets import ModelSpec, make_model
from tests.tl_versions import tl3_only

SPECS = [
    ModelSpec("tiny", n_layers=2, d_model=32, n_heads=4, d_mlp=48),
    ModelSpec("tiny", attention="bidirectional", n_layers=2, d_model=32, n_heads=4, d_mlp=48),
    ModelSpec("tiny", n_layers=1, d_model=32, n_heads=2, d_mlp=16, act_fn="relu"),
]


def _reference_forward(model: NativeTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from the weights alone: embeddings, pre-LN blocks, final LN, unembedding."""
    cfg = model.cfg
    sd = model.state_dict()

    def ln(x, prefix):
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
        return x * sd[prefix + ".w"] + sd[prefix + ".b"]

    n, pos = tokens.shape
    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:pos]
    act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu}[cfg.act_fn]
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        h = ln(x, p + "ln1")
        q = torch.einsum("bpd,hde->bphe", h, sd[p + "attn.W_Q"]) + sd[p + "attn.b_Q"]
        k = torch.einsum("bpd,hde->bphe", h, sd[p + "attn.W_K"]) + sd[p + "attn.b_K"]
        v = torch.einsum("bpd,hde->bphe", h, sd[p + "attn.W_V"]) + sd[p + "attn.b_V"]
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg.d_head)
        if cfg.attention_dir == "causal":
            scores = scores.masked_fill(~torch.ones(pos, pos, dtype=torch.bool).tril(), -1e30)
        z = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)
        x = x + torch.einsum("bqhe,hed->bqd", z, sd[p + "attn.W_O"]) + sd[p + "attn.b_O"]
        h = ln(x, p + "ln2")
        x = x + act(h @ sd[p + "mlp.W_in"] + sd[p + "mlp.b_in"]) @ sd[p + "mlp.W_out"]
        x = x + sd[p + "mlp.b_out"]
    return ln(x, "ln_final") @ sd["unembed.W_U"] + sd["unembed.b_U"]


@pytest.mark.parametrize("spec", SPECS, ids=["causal", "bidirectional", "relu"])
def test_native_matches_a_plain_torch_forward(spec):
    model = make_model(spec, vocab_size=30, seed=4, backend="native")
    tokens = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(tokens), _reference_forward(model, tokens), atol=1e-5)


def test_layers_hooks_and_edits():
    """stop/start_at_layer split the forward exactly; an edit at hook_attn_scores and hook_z
    takes effect; the hook names of TransformerLens are all there."""
    model = make_model(SPECS[0], vocab_size=30, seed=1, backend="native")
    tokens = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        mid = model(tokens, stop_at_layer=1)
        assert torch.equal(model(mid, start_at_layer=1), full)
        final = model(tokens, stop_at_layer=model.cfg.n_layers)
        assert torch.equal(model.unembed(model.ln_final(final)), full)
        names = ("hook_embed", "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post",
                 "blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post",
                 "ln_final.hook_scale")  # fmt: skip
        for name in names:
            assert name in model.hook_dict, name

        def zero_head(z, hook):
            z[:, :, 2] = 0.0
            return z

        patched = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
        assert not torch.allclose(patched, full)

        def hide_first_key(s, hook):
            return s.masked_fill(torch.arange(s.shape[-1]) == 0, float("-inf"))

        hidden = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.attn.hook_attn_scores", hide_first_key)]
        )
        # the first query sees only the first key: fully hidden -> NaN row -> zeroed pattern
        _, cache = model.run_with_cache(tokens)
        assert not torch.allclose(hidden, full)
        assert torch.all(cache["blocks.0.attn.hook_pattern"].sum(-1).sub(1).abs() < 1e-5)


def test_attention_mask_hides_padding():
    """With attention_mask, a right-padded row gives the unpadded sequence's logits at its real
    positions (causal and bidirectional)."""
    for spec in SPECS[:2]:
        model = make_model(spec, vocab_size=30, seed=2, backend="native")
        tokens = torch.randint(0, 30, (1, 6), generator=torch.Generator().manual_seed(3))
        padded = torch.cat([tokens, torch.zeros(1, 3, dtype=torch.long)], 1)
        mask = torch.tensor([[1] * 6 + [0] * 3])
        with torch.no_grad():
            alone = model(tokens)
            both = model(padded, attention_mask=mask)[:, :6]
        assert torch.allclose(alone, both, atol=1e-5), spec.attention


def test_transformer_lens_patching_runs_on_native(tiny_tokens):
    """transformer_lens.patching accepts the model; a patched head equals a hand-written hook."""
    from transformer_lens import patching

    model = make_model(SPECS[0], vocab_size=50, seed=5, backend="native")
    clean, corrupt = tiny_tokens[:3], tiny_tokens[3:]
    _, cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[:, -1, 3].mean()

    out = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, cache, metric)
    layer, head = 1, 2

    def patch(z, hook):
        z[:, :, head] = cache[hook.name][:, :, head]
        return z

    with torch.no_grad():
        ref = metric(
            model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
        )
    assert torch.allclose(out[layer, head], ref, atol=1e-6)


def test_unsupported_settings_are_refused_by_name():
    base = dict(n_layers=1, d_model=16, n_heads=2, d_mlp=8, d_vocab=10, n_ctx=8, act_fn="gelu")
    for field, value in [("positional_embedding_type", "rotary"), ("gated_mlp", True),
                         ("act_fn", "solu_ln"), ("n_key_value_heads", 1)]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            NativeConfig(**{**base, field: value})
    with pytest.raises(ValueError, match="n_ctx"):
        NativeTransformer(NativeConfig(**base))(torch.zeros(1, 9, dtype=torch.long))


def test_checkpoint_round_trip(tmp_path):
    """A native model saves as a HookedTransformer checkpoint and loads back identical."""
    from subroutine_circuits.models.checkpoint import load_checkpoint, save_checkpoint

    model = make_model(SPECS[1], vocab_size=30, seed=6, backend="native")
    save_checkpoint(tmp_path, model, meta={"x": 1})
    back, _, meta = load_checkpoint(tmp_path, backend="native")
    tokens = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
    assert type(back).__name__ == "NativeTransformer" and meta == {"x": 1}


@tl3_only
@pytest.mark.parametrize("spec", SPECS, ids=["causal", "bidirectional", "relu"])
def test_native_equals_transformer_lens_hooked_transformer(spec, tmp_path):
    """Same seed -> the same initial weights as TransformerLens 3.9's HookedTransformer, every
    cached activation equal, and checkpoints move between the two classes."""
    from subroutine_circuits.models.checkpoint import load_checkpoint, save_checkpoint

    ours = make_model(spec, vocab_size=30, seed=9, backend="native")
    theirs = make_model(spec, vocab_size=30, seed=9, backend="tl")
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, 30, (4, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, c1 = ours.run_with_cache(tokens)
        _, c2 = theirs.run_with_cache(tokens)
    assert set(c1.keys()) == set(c2.keys())
    for name in c1.keys():
        assert torch.allclose(c1[name], c2[name], atol=1e-6), name
    save_checkpoint(tmp_path, ours)
    loaded, _, _ = load_checkpoint(tmp_path, backend="tl")
    assert type(loaded).__name__ == "HookedTransformer"
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), ours(tokens), atol=1e-6)
