"""Batched activation patching equals transformer_lens.patching and a hand-written hook."""

from __future__ import annotations

import pytest
import torch

from subroutine_circuits.patching.activation import (
    activation_patching,
    merge_scores,
    unit_groups,
)


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
    groups = unit_groups(tiny_model, kinds=("head",))
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
    groups = unit_groups(tiny_model, kinds=("neuron",), layers=[0])
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
    groups = unit_groups(tiny_model, kinds=("head",))
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
        unit_groups(tiny_model, kinds=("channel",))
