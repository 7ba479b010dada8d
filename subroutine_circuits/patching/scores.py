"""Patching results (:class:`PatchScores`) and the helpers every patching method shares.

Units are :class:`~subroutine_circuits.masks.UnitGroup` s of the masks' unit vocabulary; the
global unit order (group order, then index) is the order of flat score vectors and of mask
vectors alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from subroutine_circuits.masks.units import UnitGroup, UnitMap

#: A per-example metric: maps the readout output with leading dims ``[..., batch]`` (e.g. logits
#: ``[..., batch, pos, d_vocab]``) to ``[..., batch]``. Leading dims are copies of the batch.
Metric = Callable[[Tensor], Tensor]


def resolve_groups(adapter, groups: UnitMap | Sequence[UnitGroup] | None) -> list[UnitGroup]:
    """The unit groups to patch: ``groups`` (a UnitMap or list of UnitGroup, order kept so flat
    score vectors line up with mask vectors) or, if None, the adapter's default unit map.

    Units lie on an axis >= 1 after the batch axis: ``[batch, pos, unit, ...]`` (axis 2) for
    transformers, ``[batch, channel, h, w]`` (axis 1) for CNNs; per-position patching needs
    axis 2 (see :func:`check_per_position`).
    """
    if groups is None:
        groups = adapter.unit_map()
    groups = list(groups.groups if isinstance(groups, UnitMap) else groups)
    if not groups:
        raise ValueError("no units to patch (empty unit groups)")
    hook_dict = adapter.model.hook_dict
    for g in groups:
        if not isinstance(g, UnitGroup):
            raise ValueError(f"patching expects UnitGroup objects, got {type(g).__name__}")
        if g.hook_name not in hook_dict:
            raise ValueError(f"unknown hook {g.hook_name!r} for this model")
        if g.axis < 1:
            raise ValueError(
                f"unit group {g.hook_name!r} ({g.kind}) has its units on axis {g.axis}; patching "
                "needs the units after the batch axis (axis >= 1)"
            )
    return groups


def prepare_patching(
    model: Any,
    clean_tokens: Tensor,
    corr_tokens: Tensor,
    groups: UnitMap | Sequence[UnitGroup] | None,
    per_position: bool,
    readout: Any,
) -> tuple[Any, list[UnitGroup], Any]:
    """What every patching method does first: the model's adapter (it must be patchable), the
    pair tokens checked, the unit groups resolved and checked for ``per_position``, and the
    readout by name; returns ``(adapter, groups, readout)``."""
    from subroutine_circuits.adapters import as_adapter

    adapter = as_adapter(model)
    adapter.check_patchable()
    check_pair_tokens(clean_tokens, corr_tokens)
    groups = resolve_groups(adapter, groups)
    check_per_position(groups, per_position)
    return adapter, groups, adapter.readout(readout)


def check_per_position(groups: Sequence[UnitGroup], per_position: bool) -> None:
    """Raise ValueError if ``per_position`` is asked of units that are not ``[batch, pos, unit]``
    (axis 2), e.g. CNN channels."""
    bad = [g.hook_name for g in groups if g.axis != 2]
    if per_position and bad:
        raise ValueError(
            f"per-position patching needs activations [batch, pos, unit, ...] (axis 2); "
            f"{bad[0]!r} has its units on another axis"
        )


def copy_keep(keep: Tensor, group: UnitGroup) -> Tensor:
    """``keep [k, size]`` reshaped to ``[k, 1, ..., size]`` (the unit axis in place) for
    :func:`~subroutine_circuits.masks.ablation.mix_copies`: the same units in every position."""
    return keep.reshape(keep.shape[0], *([1] * (group.axis - 1)), group.size)


def n_units(groups: Sequence[UnitGroup]) -> int:
    """Total number of units in ``groups``."""
    return sum(g.size for g in groups)


def check_pair_tokens(clean: Tensor, corr: Tensor) -> None:
    """Raise ValueError unless clean and corrupted inputs are equal-shaped ``[batch, pos]``
    tokens (or other inputs with a batch axis, e.g. images ``[batch, 3, h, w]``)."""
    if clean.ndim < 2 or corr.ndim < 2:
        raise ValueError(
            f"tokens must be [batch, pos]; got {tuple(clean.shape)}, {tuple(corr.shape)}"
        )
    if clean.shape != corr.shape:
        raise ValueError(
            f"clean and corrupted tokens differ in shape: {tuple(clean.shape)} vs "
            f"{tuple(corr.shape)} (minimal pairs must have equal token counts)"
        )
    if clean.shape[0] == 0:
        raise ValueError("empty batch of tokens")


def expand_batch(x: Tensor, k: int) -> Tensor:
    """``[batch, ...] -> [k * batch, ...]``; copy ``i`` occupies rows ``i*batch:(i+1)*batch``."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


# ----------------------------------------------------------------------------- results


@dataclass
class PatchScores:
    """Patching results for a list of unit groups.

    ``patched[hook]`` holds the mean metric of the patched run per unit (``[size]``) or per
    position and unit (``[pos, size]``). For attribution methods it is the linear estimate
    ``m_corr + attribution``. ``clean_metric`` / ``corr_metric`` are the unpatched means and
    ``n`` the number of examples (used to merge batches of different lengths).
    """

    groups: list[UnitGroup]
    patched: dict[str, Tensor]
    clean_metric: float
    corr_metric: float
    n: int
    method: str = "activation"
    per_position: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def denominator(self) -> float:
        """``m_clean - m_corr`` (raises if it is zero: the pair does not move the metric)."""
        d = self.clean_metric - self.corr_metric
        if d == 0:
            raise ValueError("clean and corrupted metrics are equal; normalised scores undefined")
        return d

    def normalised(self) -> dict[str, Tensor]:
        """``(m_patched - m_corr) / (m_clean - m_corr)`` per hook."""
        d = self.denominator
        return {h: (v - self.corr_metric) / d for h, v in self.patched.items()}

    def flat(self, normalise: bool = True) -> Float[Tensor, "n_units"]:
        """One score per unit in group order.

        Per-position results are summed over positions (their effects relative to the
        corrupted run), an approximation of patching the unit at all positions at once.
        """
        vals = self.normalised() if normalise else self.patched
        out = []
        for g in self.groups:
            v = vals[g.hook_name]
            if self.per_position:
                # effects add up over positions: sum (v - baseline), baseline 0 if normalised
                base = 0.0 if normalise else self.corr_metric
                v = (v - base).sum(0) + base
            out.append(v)
        return torch.cat(out).float().cpu()

    def layer_grid(self, kind: str = "head", normalise: bool = False) -> Tensor:
        """Stack the groups of one kind by layer: ``[n_layers, size]`` or ``[n_layers, pos, size]``
        (the layout of ``transformer_lens.patching.get_act_patch_attn_head_out_*``)."""
        vals = self.normalised() if normalise else self.patched
        gs = sorted((g for g in self.groups if g.kind == kind), key=lambda g: g.layer)
        if not gs:
            raise ValueError(f"no {kind!r} groups in these scores")
        return torch.stack([vals[g.hook_name] for g in gs])


def merge_scores(parts: Sequence[PatchScores]) -> PatchScores:
    """Combine results of batches (e.g. length groups) weighted by their example counts."""
    if not parts:
        raise ValueError("no patching results to merge")
    if len(parts) == 1:
        return parts[0]
    if any(p.per_position for p in parts):
        raise ValueError("per-position scores of different batches cannot be merged")
    total = sum(p.n for p in parts)

    def wavg(vals):
        return sum(p.n * v for p, v in zip(parts, vals)) / total

    first = parts[0]
    return PatchScores(
        groups=first.groups,
        patched={h: wavg([p.patched[h] for p in parts]) for h in first.patched},
        clean_metric=float(wavg([p.clean_metric for p in parts])),
        corr_metric=float(wavg([p.corr_metric for p in parts])),
        n=total,
        method=first.method,
        per_position=False,
    )
