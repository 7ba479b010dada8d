"""Attribution patching and integrated gradients against independent computations."""

from __future__ import annotations

import torch

from subroutine_circuits.adapters import tl_unit_map
from subroutine_circuits.patching.activation import activation_patching
from subroutine_circuits.patching.attribution import attribution_patching, integrated_gradients


def _pair(tokens):
    corr = tokens.clone()
    corr[:, 2] = (corr[:, 2] + 13) % 50
    return tokens, corr


def _metric(logits):
    return logits[..., -1, 3] - logits[..., -1, 8]


def test_attribution_equals_manual_gradient(tiny_model, tiny_tokens):
    """(clean - corr) . grad, with the gradient from TransformerLens' own backward hooks."""
    clean, corr = _pair(tiny_tokens)
    res = attribution_patching(tiny_model, clean, corr, _metric, per_position=True)
    _, clean_cache = tiny_model.run_with_cache(clean)
    grads, acts = {}, {}

    def fwd(act, hook):
        acts[hook.name] = act.detach()

    def bwd(grad, hook):
        grads[hook.name] = grad.detach()

    names = ["blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"]
    tiny_model.reset_hooks()
    for n in names:
        tiny_model.add_hook(n, fwd, "fwd")
        tiny_model.add_hook(n, bwd, "bwd")
    _metric(tiny_model(corr)).mean().backward()
    tiny_model.reset_hooks()
    z = "blocks.0.attn.hook_z"
    exp_z = ((clean_cache[z] - acts[z]) * grads[z]).sum(0).sum(-1)  # [pos, head]
    got_z = res.patched[z] - res.corr_metric
    assert torch.allclose(got_z, exp_z, atol=1e-5)
    assert exp_z.abs().max() > 1e-3
    n = "blocks.1.mlp.hook_post"
    exp_n = ((clean_cache[n] - acts[n]) * grads[n]).sum(0)
    assert torch.allclose(res.patched[n] - res.corr_metric, exp_n, atol=1e-5)
    # all-position scores are the per-position ones summed
    res_all = attribution_patching(tiny_model, clean, corr, _metric)
    assert torch.allclose(res_all.patched[z] - res_all.corr_metric, exp_z.sum(0), atol=1e-5)


def test_attribution_correlates_with_activation(tiny_model, tiny_tokens):
    clean, corr = _pair(tiny_tokens)
    groups = tl_unit_map(tiny_model, kinds=("head",)).groups
    act = activation_patching(tiny_model, clean, corr, _metric, groups).flat()
    att = attribution_patching(tiny_model, clean, corr, _metric, groups).flat()
    c = torch.corrcoef(torch.stack([act, att]))[0, 1]
    assert c > 0.5


def test_integrated_gradients_completeness(tiny_model, tiny_tokens):
    """Summed over one hook point, IG equals the effect of patching the whole hook point."""
    clean, corr = _pair(tiny_tokens)
    groups = tl_unit_map(tiny_model, kinds=("head", "neuron"), layers=[0]).groups
    ig = integrated_gradients(tiny_model, clean, corr, _metric, groups, steps=32, chunk_rows=64)
    _, clean_cache = tiny_model.run_with_cache(clean)
    for g in groups:

        def patch_all(act, hook):
            return clean_cache[hook.name]

        logits = tiny_model.run_with_hooks(corr, fwd_hooks=[(g.hook_name, patch_all)])
        effect = float(_metric(logits).mean()) - ig.corr_metric
        total = float((ig.patched[g.hook_name] - ig.corr_metric).sum())
        assert abs(effect) > 1e-3
        assert abs(total - effect) < 0.02 * abs(effect) + 1e-4
