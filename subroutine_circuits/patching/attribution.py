"""Attribution patching: a first-order (gradient) estimate of activation patching.

For a unit with activation ``a`` the estimate of patching it from clean into corrupted is
``(a_clean - a_corr) . d metric / d a`` evaluated at the corrupted run: one forward pass and
one backward pass for all units. Integrated gradients replaces the gradient by its average
along the straight path from ``a_corr`` to ``a_clean`` (one hook point at a time, all other
activations computed normally), which is exact for the whole hook point (completeness).

Results are :class:`~subroutine_circuits.patching.activation.PatchScores` whose ``patched``
values are ``m_corr + estimate`` so that ``normalised()`` has the same meaning and sign as for
activation patching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from subroutine_circuits.adapters.base import Readout, named_hooks
from subroutine_circuits.masks.units import UnitGroup, UnitMap
from subroutine_circuits.memory import rows_per_pass, run_chunked
from subroutine_circuits.patching.activation import (
    Metric,
    PatchScores,
    expand_batch,
)
from subroutine_circuits.patching.scores import prepare_patching


def _reduce(delta_grad: Tensor, per_position: bool, axis: int = 2) -> Tensor:
    """``[batch, pos, size, ...] -> [pos, size]`` or ``[size]``: sum over batch and features
    (without ``per_position``: over every axis but the unit ``axis``)."""
    if not per_position:
        return delta_grad.sum(dim=[d for d in range(delta_grad.ndim) if d != axis])
    x = delta_grad.sum(0)
    if x.ndim > 2:
        x = x.flatten(2).sum(-1)
    return x if per_position else x.sum(0)


def attribution_patching(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corr_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    groups: UnitMap | Sequence[UnitGroup] | None = None,
    per_position: bool = False,
    readout: str | Readout = "logits",
) -> PatchScores:
    """Gradient estimate of patching every unit: one forward and one backward pass.

    The gradient of the batch-mean metric is taken at the corrupted activations (through all
    paths, including later layers), so the estimate of a unit is the batch mean of
    ``(a_clean - a_corr) . grad``.
    """
    adapter, groups, readout = prepare_patching(
        model, clean_tokens, corr_tokens, groups, per_position, readout
    )
    model = adapter.model
    hooks = [g.hook_name for g in groups]
    with torch.no_grad():
        _, clean_acts, clean_out = adapter.layer_states(clean_tokens, hooks, readout)
    m_clean = float(metric(clean_out).float().mean())

    probes: dict[str, Tensor] = {}
    corr_acts: dict[str, Tensor] = {}

    def add_probe(act, hook):
        # a zero leaf added to the activation: d metric / d probe = d metric / d act,
        # through every downstream path, while the forward pass is unchanged.
        probe = torch.zeros_like(act, requires_grad=True)
        probes[hook.name] = probe
        corr_acts[hook.name] = act.detach()
        return act + probe

    with torch.enable_grad(), model.hooks(fwd_hooks=named_hooks(hooks, add_probe)):
        out = adapter.forward(corr_tokens, readout)
        m = metric(out).float().mean()
        grads = torch.autograd.grad(m, [probes[h] for h in hooks], allow_unused=True)
    m_corr = float(m.detach())
    patched = {}
    for g, grad in zip(groups, grads):
        h = g.hook_name
        if grad is None:
            grad = torch.zeros_like(probes[h])
        est = _reduce((clean_acts[h] - corr_acts[h]) * grad, per_position, g.axis)
        patched[h] = (m_corr + est).detach().float().cpu()
    return PatchScores(
        groups=groups,
        patched=patched,
        clean_metric=m_clean,
        corr_metric=m_corr,
        n=corr_tokens.shape[0],
        method="attribution",
        per_position=per_position,
    )


def integrated_gradients(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corr_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    groups: UnitMap | Sequence[UnitGroup] | None = None,
    per_position: bool = False,
    readout: str | Readout = "logits",
    steps: int = 16,
    chunk_rows: int = 4096,
) -> PatchScores:
    """Integrated-gradients estimate of patching every unit (midpoint rule, ``steps`` points).

    Per hook point, its activation is set to ``a_corr + alpha (a_clean - a_corr)`` for
    ``alpha = (i + 0.5) / steps``; the alphas run as copies of the batch from the cached
    corrupted ``resid_pre`` of the unit's layer, at most ``chunk_rows`` rows per pass (fewer
    when the worker's GPU memory budget says so; halved while a pass runs out of GPU memory).
    Summed over the units of one hook point the estimates approach the effect of patching that
    whole hook point.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    adapter, groups, readout = prepare_patching(
        model, clean_tokens, corr_tokens, groups, per_position, readout
    )
    model = adapter.model
    hooks = [g.hook_name for g in groups]
    with torch.no_grad():
        _, clean_acts, clean_out = adapter.layer_states(clean_tokens, hooks, readout)
        corr_resids, corr_acts, corr_out = adapter.layer_states(corr_tokens, hooks, readout)
    m_clean = float(metric(clean_out).float().mean())
    m_corr = float(metric(corr_out).float().mean())
    batch = corr_tokens.shape[0]
    chunk_rows = rows_per_pass(model, corr_tokens.shape[1], chunk_rows, grad=True)
    k_max = max(1, chunk_rows // batch)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps

    patched = {}
    for g in groups:
        h = g.hook_name
        delta = clean_acts[h] - corr_acts[h]

        def grad_sum(
            part: Float[Tensor, " k"], h: str = h, delta: Tensor = delta, g: UnitGroup = g
        ) -> Tensor:
            """The summed gradients of the alphas ``part`` (one pass)."""
            a = part.to(delta.device, delta.dtype)
            k = len(a)
            shape = (k,) + (1,) * delta.ndim
            interp = (corr_acts[h].unsqueeze(0) + a.view(shape) * delta.unsqueeze(0)).reshape(
                k * batch, *delta.shape[1:]
            )
            interp = interp.detach().requires_grad_(True)

            def set_act(act, hook, interp=interp):
                return interp

            with torch.enable_grad(), model.hooks(fwd_hooks=[(h, set_act)]):
                start = adapter.layer_of(g.layer)
                out = adapter.run_from_layer(expand_batch(corr_resids[start], k), start, readout)
                m = metric(out.reshape(k, batch, *out.shape[1:])).float().mean(-1).sum()
                (grad,) = torch.autograd.grad(m, [interp])
            return grad.reshape(k, batch, *delta.shape[1:]).sum(0)

        total = None
        for part in run_chunked(grad_sum, alphas, k_max, label="steps", key="patching.ig"):
            total = part if total is None else total + part
        est = _reduce(delta * total / steps, per_position, g.axis)
        patched[h] = (m_corr + est).detach().float().cpu()
    return PatchScores(
        groups=groups,
        patched=patched,
        clean_metric=m_clean,
        corr_metric=m_corr,
        n=batch,
        method="integrated_gradients",
        per_position=per_position,
        extra={"steps": steps},
    )
