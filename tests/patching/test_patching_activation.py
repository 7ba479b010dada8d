"""Batched activation patching equals transformer_lens.patching and a hand-written hook."""

from __future__ import annotations

import pytest
import torch

from subroutine_circuits.adapters import tl_unit_map
from subroutine_circuits.patching.activation import activation_patching, merge_scores


def _pair(tiny_tokens):
    """Clean tokens and a corrupted copy with two positions changed."""
    clean = tiny_tokens
    corr = clean.clone()
    corr[:, 3] = (corr[:, 3] + 7) % 50
    corr[:, 6] = (corr[:, 6] + 11) % 50
    return clean, corr


def _logit_diff(logits):
    """Per-example logit difference of tokens 5 and 9 at the last position."""
    return logits[..., -1, 5] - logits[..., -1, 9]


@pytest.mark.parametrize("per_position", [False, True])
def test_heads_equal_transformer_lens(tiny_model, tiny_tokens, per_position):
    from transformer_lens import patching

    clean, corr = _pair(tiny_tokens)
    _, clean_cache = tiny_model.run_with_cache(clean)
    tl_fn = (
        patching.get_act_patch_attn_head_out_by_pos
        if per_position
        else patching.get_act_patch_attn_head_out_all_pos
    )
    expected = tl_fn(tiny_model, corr, clean_cache, lambda lg: _logit_diff(lg).mean())
    groups = tl_unit_map(tiny_model, kinds=("head",)).groups
    ours = activation_patching(
        tiny_model, clean, corr, _logit_diff, groups, per_position=per_position, chunk_rows=18
    )
    grid = ours.layer_grid("head")
    assert grid.shape == expected.shape
    assert torch.allclose(grid, expected.cpu(), atol=1e-4)
    # the patches really move the metric, so the equality is not trivially about constants
    assert (expected - ours.corr_metric).abs().max() > 1e-3


def test_neurons_equal_hand_written_hook(tiny_model, tiny_tokens):
    clean, corr = _pair(tiny_tokens)
    _, clean_cache = tiny_model.run_with_cache(clean)
    groups = tl_unit_map(tiny_model, kinds=("neuron",), layers=[0]).groups
    ours = activation_patching(tiny_model, clean, corr, _logit_diff, groups, chunk_rows=60)
    hook = "blocks.0.mlp.hook_post"
    for n in [0, 5, 17, 63]:

        def patch(act, hook, n=n):
            act = act.clone()
            act[:, :, n] = clean_cache[hook.name][:, :, n]
            return act

        logits = tiny_model.run_with_hooks(corr, fwd_hooks=[(hook, patch)])
        assert abs(float(_logit_diff(logits).mean()) - float(ours.patched[hook][n])) < 1e-4


def test_normalised_scores_and_full_patch(tiny_model, tiny_tokens):
    clean, corr = _pair(tiny_tokens)
    res = activation_patching(tiny_model, clean, corr, _logit_diff)
    m_clean = float(_logit_diff(tiny_model(clean)).mean())
    m_corr = float(_logit_diff(tiny_model(corr)).mean())
    assert abs(res.clean_metric - m_clean) < 1e-5 and abs(res.corr_metric - m_corr) < 1e-5
    flat = res.flat()
    assert flat.shape == (2 * 4 + 2 * 64,)
    hook = "blocks.1.attn.hook_z"
    expected = (res.patched[hook] - m_corr) / (m_clean - m_corr)
    assert torch.allclose(flat[4 + 64 : 8 + 64], expected)


def test_merge_weights_by_count(tiny_model, tiny_tokens):
    clean, corr = _pair(tiny_tokens)
    groups = tl_unit_map(tiny_model, kinds=("head",)).groups
    a = activation_patching(tiny_model, clean[:2], corr[:2], _logit_diff, groups)
    b = activation_patching(tiny_model, clean[2:], corr[2:], _logit_diff, groups)
    whole = activation_patching(tiny_model, clean, corr, _logit_diff, groups)
    merged = merge_scores([a, b])
    for h in whole.patched:
        assert torch.allclose(merged.patched[h], whole.patched[h], atol=1e-5)
    assert abs(merged.clean_metric - whole.clean_metric) < 1e-5


def test_bad_input(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match="differ in shape"):
        activation_patching(tiny_model, tiny_tokens, tiny_tokens[:, :5], _logit_diff)
    with pytest.raises(ValueError, match="unknown unit kind"):
        tl_unit_map(tiny_model, kinds=("channel",))


# ----------------------------------------------------------------------------- fast path


def _make_model(normalization_type: str, act_fn: str, n_layers: int, seed: int = 3):
    """A tiny causal HookedTransformer of the given block type (random weights)."""
    from subroutine_circuits.models.presets import hooked_transformer

    return hooked_transformer(
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=50,
        n_ctx=16,
        act_fn=act_fn,
        normalization_type=normalization_type,
        seed=seed,
        device="cpu",
    )


def _mean_over_pos_diff(logits):
    """A metric that reads every position: mean over positions of a logit difference."""
    return logits[..., 5].mean(-1) - logits[..., 9].mean(-1)


def _tl_by_pos(model, clean, corr, metric):
    """TransformerLens' per-position head-output patching (the reference)."""
    from transformer_lens import patching

    _, clean_cache = model.run_with_cache(clean)
    return patching.get_act_patch_attn_head_out_by_pos(
        model, corr, clean_cache, lambda lg: metric(lg).mean()
    )


@pytest.mark.parametrize(
    "norm, act, n_layers, n_pos, metric, path",
    [
        ("LN", "gelu", 2, 8, _logit_diff, "fast-last"),
        ("LNPre", "relu", 3, 5, _logit_diff, "fast-last"),
        ("LN", "relu", 2, 6, _mean_over_pos_diff, "fast-suffix"),
        ("LNPre", "gelu", 2, 7, _mean_over_pos_diff, "fast-suffix"),
        ("LN", "gelu", 2, 1, _logit_diff, "fast-last"),
    ],
)
def test_fast_path_equals_transformer_lens_and_generic(norm, act, n_layers, n_pos, metric, path):
    model = _make_model(norm, act, n_layers)
    g = torch.Generator().manual_seed(n_pos)
    clean = torch.randint(0, 50, (5, n_pos), generator=g)
    corr = clean.clone()
    corr[:, n_pos // 2] = (corr[:, n_pos // 2] + 13) % 50
    groups = tl_unit_map(model, kinds=("head",)).groups
    expected = _tl_by_pos(model, clean, corr, metric)
    # chunk_rows=7 with batch 5: one head per chunk, exercising the chunking
    fast = activation_patching(model, clean, corr, metric, groups, per_position=True, chunk_rows=7)
    generic = activation_patching(model, clean, corr, metric, groups, per_position=True, fast=False)
    assert fast.extra["path"] == path
    assert generic.extra["path"] == "generic"
    assert fast.layer_grid("head").shape == (n_layers, n_pos, 4)
    assert torch.allclose(fast.layer_grid("head"), expected.cpu(), atol=1e-4)
    assert torch.allclose(fast.layer_grid("head"), generic.layer_grid("head"), atol=1e-4)
    assert abs(fast.clean_metric - generic.clean_metric) < 1e-6
    assert abs(fast.corr_metric - generic.corr_metric) < 1e-6
    # the patches really move the metric
    assert (expected - fast.corr_metric).abs().max() > 1e-3


def test_fast_path_hidden_last_readout_equals_generic(tiny_model, tiny_tokens):
    clean, corr = _pair(tiny_tokens)
    w = torch.randn(32, generator=torch.Generator().manual_seed(0))

    def metric(hidden):  # [..., batch, d_model] -> [..., batch]
        return hidden @ w

    groups = tl_unit_map(tiny_model, kinds=("head",)).groups
    kw = dict(per_position=True, readout="hidden_last")
    fast = activation_patching(tiny_model, clean, corr, metric, groups, **kw)
    generic = activation_patching(tiny_model, clean, corr, metric, groups, fast=False, **kw)
    assert fast.extra["path"] == "fast-last"
    assert torch.allclose(fast.layer_grid("head"), generic.layer_grid("head"), atol=1e-4)
    assert (generic.layer_grid("head") - generic.corr_metric).abs().max() > 1e-3


def test_fast_path_falls_back_for_bidirectional_model(tiny_tokens):
    from conftest import make_tiny_transformer

    model = make_tiny_transformer(seed=2, attention_dir="bidirectional")
    clean, corr = _pair(tiny_tokens)
    groups = tl_unit_map(model, kinds=("head",)).groups
    res = activation_patching(model, clean, corr, _logit_diff, groups, per_position=True)
    assert res.extra["path"] == "generic"
    assert "attention_dir" in res.extra["fallback_reason"]
    expected = _tl_by_pos(model, clean, corr, _logit_diff)
    assert torch.allclose(res.layer_grid("head"), expected.cpu(), atol=1e-4)


def test_fast_path_falls_back_with_hooks_and_for_neurons(tiny_model, tiny_tokens):
    clean, corr = _pair(tiny_tokens)
    heads = tl_unit_map(tiny_model, kinds=("head",)).groups

    def scale(act, hook):  # a hook the fast path would bypass (like a mask)
        return act * 0.5

    with tiny_model.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", scale)]):
        res = activation_patching(tiny_model, clean, corr, _logit_diff, heads, per_position=True)
        hooked_corr = float(_logit_diff(tiny_model(corr)).mean())
    assert res.extra["path"] == "generic" and "hooks" in res.extra["fallback_reason"]
    assert abs(res.corr_metric - hooked_corr) < 1e-5
    neurons = tl_unit_map(tiny_model, kinds=("neuron",), layers=[1]).groups
    res = activation_patching(tiny_model, clean, corr, _logit_diff, neurons, per_position=True)
    assert res.extra["path"] == "generic"
    res = activation_patching(tiny_model, clean, corr, _logit_diff, heads, per_position=False)
    assert res.extra["path"] == "generic"


def test_metric_probe_detects_last_position_metrics():
    from subroutine_circuits.patching.fast_forward import metric_reads_last_position

    logits = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(0))
    assert metric_reads_last_position(_logit_diff, logits)
    assert not metric_reads_last_position(_mean_over_pos_diff, logits)
    assert not metric_reads_last_position(lambda lg: lg[..., 2, 5], logits)  # reads position 2
    assert not metric_reads_last_position(lambda lg: lg[..., 0, 5] - lg[..., -1, 5], logits)


def test_fast_path_layer_subset(tiny_tokens):
    model = _make_model("LN", "gelu", 3, seed=5)
    clean, corr = _pair(tiny_tokens)
    groups = tl_unit_map(model, kinds=("head",), layers=[2, 1]).groups  # unsorted subset
    fast = activation_patching(model, clean, corr, _logit_diff, groups, per_position=True)
    generic = activation_patching(
        model, clean, corr, _logit_diff, groups, per_position=True, fast=False
    )
    assert fast.extra["path"] == "fast-last"
    for h in generic.patched:
        assert fast.patched[h].shape == (10, 4)
        assert torch.allclose(fast.patched[h], generic.patched[h], atol=1e-4)
    # last layer: only the last position can move the last-position metric
    last = fast.patched["blocks.2.attn.hook_z"]
    assert torch.all(last[:-1] == fast.corr_metric)
    assert (generic.patched["blocks.2.attn.hook_z"][:-1] - generic.corr_metric).abs().max() < 1e-5
