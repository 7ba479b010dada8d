"""The one ablation implementation: how a unit's activation is replaced by its ablation value.

Every place that removes units goes through these functions: the unit masks of the mask
experiment (:class:`~subroutine_circuits.masks.UnitMask`), patching's cross-ablation and
faithfulness circuits (:mod:`subroutine_circuits.patching.circuits`) and the activation-patching
hooks (which "ablate" a unit to its clean value).

- :func:`mix`: ``x' = keep * x + (1 - keep) * value`` (``value`` = zero, a mean or a resampled
  activation; a boolean ``keep`` selects exactly, a float ``keep`` is a soft mask).
- :func:`mix_copies`: the same for ``k`` copies of a batch stacked along the batch axis, each
  copy with its own ``keep`` (many circuits / masks in one forward pass).
- :func:`reference_mean`: the mean-ablation value of one unit group over reference activations
  (optionally weighted by real positions, optionally split into readout / other positions).
- :func:`readout_positions`: a context in which position-aware mean ablation knows which
  positions are the readout positions of the current forward pass (set by model adapters).

Weight masks use the same formula on parameter tensors (``reinit`` ablation: the value is a
re-initialised weight), see :class:`~subroutine_circuits.masks.WeightMask`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .units import UnitGroup

# Readout positions ([batch, pos], True = the position the readout reads) of the forward pass
# in progress; None outside :func:`readout_positions`.
_READOUT_POS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "subroutine_circuits_readout_positions", default=None
)


@contextlib.contextmanager
def readout_positions(pos: Bool[Tensor, "batch pos"] | None) -> Iterator[None]:
    """Within the block, position-aware ablation treats ``pos`` as the readout positions."""
    token = _READOUT_POS.set(pos)
    try:
        yield
    finally:
        _READOUT_POS.reset(token)


def current_readout_positions() -> Bool[Tensor, "batch pos"] | None:
    """The readout positions set by the innermost :func:`readout_positions` (or None)."""
    return _READOUT_POS.get()


def unit_shape(group: UnitGroup, ndim: int) -> list[int]:
    """Shape that broadcasts a per-unit vector ``[size]`` along ``group.axis`` of an activation."""
    shape = [1] * ndim
    shape[group.axis] = group.size
    return shape


def mix(x: Tensor, keep: Tensor, value: Tensor | None = None) -> Tensor:
    """``keep * x + (1 - keep) * value``: the ablation of the units where ``keep`` is off.

    ``keep`` broadcasts against ``x``; a boolean ``keep`` selects exactly (``torch.where``), a
    float ``keep`` mixes (soft masks; gradients reach ``keep``). ``value=None`` is zero
    ablation (``x * keep``).
    """
    if keep.dtype == torch.bool:
        if value is None:
            return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.where(keep, x, value.to(device=x.device, dtype=x.dtype))
    if value is None:
        return x * keep
    return keep * x + (1 - keep) * value


def mix_copies(x: Tensor, keep: Tensor, value: Tensor | None, k: int) -> Tensor:
    """:func:`mix` on ``k`` copies of a batch stacked along axis 0 (copy ``i`` at rows
    ``i*b:(i+1)*b``), copy ``i`` using ``keep[i]``.

    ``keep`` has shape ``[k, *unit_dims]`` where ``unit_dims`` are the activation's axes after
    the batch axis up to and including the unit axis (e.g. ``[k, pos, head]`` for ``hook_z``);
    ``value`` broadcasts against one copy ``[b, ...]`` (zero if None).
    """
    if x.shape[0] % k:
        raise ValueError(f"{x.shape[0]} rows cannot be split into {k} copies")
    b = x.shape[0] // k
    v = x.reshape(k, b, *x.shape[1:])
    s = keep.reshape(k, 1, *keep.shape[1:], *([1] * (x.ndim - keep.ndim)))
    return mix(v, s, value).reshape(x.shape)


def _mean(x: Tensor, dims: list[int], weight: Tensor | None) -> Tensor:
    """Mean of ``x`` over ``dims`` (keepdim), weighted by ``weight`` if given."""
    if weight is None:
        return x.mean(dim=dims, keepdim=True)
    return (x * weight).sum(dim=dims, keepdim=True) / weight.sum(dim=dims, keepdim=True)


def reference_mean(
    group: UnitGroup,
    x: Float[Tensor, "..."],
    pos_mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "..."]:
    """Per-unit mean of reference activations ``x`` of one unit group (keepdim, broadcastable).

    The mean runs over every axis except the unit axis and the group's ``feature_axes`` (batch
    and positions for heads/neurons, batch and space for CNN channels). ``pos_mask``
    (``[batch, pos]``, True = a position to include, e.g. a real token) restricts axes 0 and 1.
    """
    x = x.detach().float()
    dims = [d for d in range(x.dim()) if d != group.axis and d not in group.feature_axes]
    if pos_mask is None:
        return _mean(x, dims, None)
    pm = torch.as_tensor(pos_mask).bool().to(x.device)
    if pm.dim() != 2 or tuple(x.shape[:2]) != tuple(pm.shape):
        raise ValueError(
            f"pos_mask of shape {tuple(pm.shape)} does not match the batch/pos axes of "
            f"{group.hook_name!r} activations {tuple(x.shape)}"
        )
    if 0 not in dims or 1 not in dims:
        raise ValueError(f"pos_mask needs axes 0 and 1 of {group.hook_name!r} to be averaged")
    if not pm.any():
        raise ValueError(f"pos_mask selects no position for {group.hook_name!r}")
    w = pm.float().reshape(*pm.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return _mean(x, dims, w)


def pooled_mean(group: UnitGroup, xs: Sequence[Tensor]) -> Float[Tensor, "..."]:
    """Per-unit mean over several reference tensors of one group (all positions count alike).

    Equivalent to :func:`reference_mean` of their concatenation along the batch axis; used when
    the reference inputs come in batches of different shapes (e.g. minimal pairs grouped by
    length). Returned keepdim (``[1, 1, ..., size, ...]``).
    """
    if not xs:
        raise ValueError(f"no reference activations for {group.hook_name!r}")
    total, count = None, 0
    for x in xs:
        x = x.detach()
        dims = [d for d in range(x.dim()) if d != group.axis and d not in group.feature_axes]
        s = x.sum(dim=dims, keepdim=True)
        total = s if total is None else total + s
        n = 1
        for d in dims:
            n *= x.shape[d]
        count += n
    return total / count
