"""Batched activation patching over heads and MLP neurons.

Convention (the same as ``transformer_lens.patching``): the model runs on the *corrupted*
input and one unit at a time receives its activation from the *clean* run ("denoising").
The score of a unit is the mean over the batch of a per-example metric of the patched run; the
normalised score is ``(m_patched - m_corr) / (m_clean - m_corr)``.

Speed: units of layer ``l`` only change layers ``>= l``. The corrupted run is done once and its
``resid_pre`` of every layer is kept; the suffix from layer ``l`` then runs on a batch expanded
``k`` times in which copy ``i`` patches unit ``i`` (chunked to bound memory).

Units follow the unit-map conventions of :mod:`subroutine_circuits.masks`: heads are axis 2 of
``blocks.{l}.attn.hook_z`` (``[batch, pos, head, d_head]``), neurons axis 2 of
``blocks.{l}.mlp.hook_post`` (``[batch, pos, d_mlp]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from subroutine_circuits.adapters.base import Readout, named_hooks
from subroutine_circuits.masks.ablation import mix_copies
from subroutine_circuits.masks.units import UnitGroup, UnitMap
from subroutine_circuits.memory import rows_per_pass, run_chunked, with_backoff
from subroutine_circuits.patching.fast_forward import (
    fast_head_patching_by_pos,
    fast_path_unsupported,
    resolve_fast_variant,
)
from subroutine_circuits.patching.scores import (
    Metric,
    PatchScores,
    check_pair_tokens,
    expand_batch,
    merge_scores,
    n_units,
    prepare_patching,
    resolve_groups,
)

__all__ = [
    "Metric",
    "PatchScores",
    "activation_patching",
    "check_pair_tokens",
    "expand_batch",
    "merge_scores",
    "n_units",
    "resolve_groups",
]

# ----------------------------------------------------------------------------- activation patching


@torch.no_grad()
def activation_patching(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corr_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    groups: UnitMap | Sequence[UnitGroup] | None = None,
    per_position: bool = False,
    readout: str | Readout = "logits",
    chunk_rows: int = 4096,
    fast: bool | str = True,
) -> PatchScores:
    """Patch every unit (optionally at every position) from the clean into the corrupted run.

    ``metric`` maps readout output with leading dims ``[..., batch]`` to ``[..., batch]``; the
    score of a patch is its mean over the batch. ``chunk_rows`` bounds the rows of one forward
    pass (copies x batch), lowered to what the worker's GPU memory budget allows
    (:func:`subroutine_circuits.memory.rows_per_pass`); a pass that runs out of GPU memory is
    retried with half the copies. Hooks already on the model (e.g. masks) stay active.

    With ``fast`` (default), per-position head patching of a standard causal model without
    hooks runs on the exact suffix-only path of
    :mod:`subroutine_circuits.patching.fast_forward`; everything else (and ``fast=False``) runs
    the generic path. ``fast`` may also name a fast-path variant
    (:data:`~subroutine_circuits.patching.fast_forward.FAST_VARIANTS`, ``True`` = ``"auto"``).
    ``extra["path"]`` of the result names the path taken (``"generic"``,
    ``"fast-last"`` or ``"fast-suffix"``) and ``extra["fallback_reason"]`` why the fast path
    was not taken.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    adapter, groups, readout = prepare_patching(
        model, clean_tokens, corr_tokens, groups, per_position, readout
    )
    chunk_rows = rows_per_pass(adapter.model, corr_tokens.shape[1], chunk_rows)
    reason = "fast=False"
    if isinstance(fast, str) or fast:
        variant = fast if isinstance(fast, str) else "auto"
        resolve_fast_variant(variant, clean_tokens.device)  # unknown names fail here
        reason = fast_path_unsupported(adapter.model, groups, per_position, readout)
        if reason is None:  # the fast path plans its chunks of patches: retried whole
            batch = corr_tokens.shape[0]

            def fast_path(k: int) -> PatchScores:
                """The fast path with ``k`` patches per pass (``k * batch`` rows)."""
                return fast_head_patching_by_pos(
                    adapter, clean_tokens, corr_tokens, metric, groups, readout, k * batch, variant
                )

            k_max = max(1, chunk_rows // batch)
            return with_backoff(fast_path, k_max, label="patches", key="patching.fast")
    return _generic_patching(
        adapter, clean_tokens, corr_tokens, metric, groups, per_position, readout, chunk_rows,
        reason,
    )  # fmt: skip


#: One patch: ``(group, unit index, position or -1 for all positions)``.
_Item = tuple[UnitGroup, int, int]


def _patch_items(groups: Sequence[UnitGroup], layer: int, n_pos: int, per_position: bool):
    """Every patch of the groups of ``layer``, in unit (then position) order."""
    return [
        (g, u, p)
        for g in groups
        if g.layer == layer
        for u in range(g.size)
        for p in (range(n_pos) if per_position else [-1])
    ]


def _selections(
    chunk: list[_Item],
    groups: Sequence[UnitGroup],
    layer: int,
    n_pos: int,
    device,
    per_position: bool = True,
) -> dict[str, Tensor]:
    """Per hook of ``layer``: True where copy ``i`` patches a unit; ``[k, pos, size]`` per
    position, else ``[k, 1.., size]`` broadcasting over every axis before the unit axis."""
    k = len(chunk)
    sels = {}
    for g in groups:
        if g.layer != layer:
            continue
        # built on the CPU, moved once (avoids one tiny kernel per unit on a GPU)
        lead = (n_pos,) if per_position else (1,) * (g.axis - 1)
        sel = torch.zeros(k, *lead, g.size, dtype=torch.bool)
        for i, (gi, u, p) in enumerate(chunk):
            if gi is g:
                if p < 0:
                    sel[i, ..., u] = True
                else:
                    sel[i, p, u] = True
        if sel.any():
            sels[g.hook_name] = sel.to(device)
    return sels


def _generic_patching(
    adapter, clean_tokens, corr_tokens, metric, groups, per_position, readout, chunk_rows, reason
) -> PatchScores:
    """The generic path: per layer, chunks of patches run as copies of the corrupted batch
    from that layer's cached input, each copy with its units set to their clean values."""
    hooks = [g.hook_name for g in groups]
    _, clean_acts, clean_out = adapter.layer_states(clean_tokens, hooks, readout)
    corr_resids, _, corr_out = adapter.layer_states(corr_tokens, [], readout)
    m_clean = float(metric(clean_out).float().mean())
    m_corr = float(metric(corr_out).float().mean())
    batch, n_pos = corr_tokens.shape[:2]
    k_max = max(1, chunk_rows // batch)
    patched = {
        g.hook_name: torch.zeros((n_pos, g.size) if per_position else (g.size,)) for g in groups
    }
    for layer in sorted({g.layer for g in groups}):
        items = _patch_items(groups, layer, n_pos, per_position)
        start_layer = adapter.layer_of(layer)
        resid = corr_resids[start_layer]

        def run_chunk(
            chunk: list[_Item],
            layer: int = layer,
            start_layer: int = start_layer,
            resid: Tensor = resid,
        ) -> None:
            k = len(chunk)
            sels = _selections(chunk, groups, layer, n_pos, resid.device, per_position)

            def hook_fn(act, hook, k=k, sels=sels):
                # the patched units take their clean value: "ablate" them to the clean run
                return mix_copies(act, ~sels[hook.name], clean_acts[hook.name], k)

            with adapter.model.hooks(fwd_hooks=named_hooks(list(sels), hook_fn)):
                out = adapter.run_from_layer(expand_batch(resid, k), start_layer, readout)
            vals = metric(out.reshape(k, batch, *out.shape[1:])).float().mean(-1).cpu()
            for i, (g, u, p) in enumerate(chunk):
                if p < 0:
                    patched[g.hook_name][u] = vals[i]
                else:
                    patched[g.hook_name][p, u] = vals[i]

        run_chunked(run_chunk, items, k_max, label="patches", key="patching.generic")
    return PatchScores(
        groups=list(groups),
        patched=patched,
        clean_metric=m_clean,
        corr_metric=m_corr,
        n=batch,
        method="activation",
        per_position=per_position,
        extra={"path": "generic", "fallback_reason": reason},
    )
