"""Unit maps: where the maskable units of a model live.

A *unit* is one slice of a hooked activation along one axis: an attention head of
``blocks.{l}.attn.hook_z`` (axis 2 of ``[batch, pos, head, d_head]``), an MLP neuron of
``blocks.{l}.mlp.hook_post`` (axis 2 of ``[batch, pos, d_mlp]``) or, for a CNN built as a
``HookedRootModule``, a channel (axis 1 of ``[batch, channel, h, w]``).

A :class:`UnitMap` is an ordered list of :class:`UnitGroup` (one per hook). The global unit
order used everywhere (``flat_binary``, ``units()``, patching scores) is group order, then index.
This module knows no model family: a model adapter (``subroutine_circuits.adapters``) builds the
unit map of its family (``adapter.unit_map(kinds=..., layers=...)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

KNOWN_KINDS = ("head", "neuron", "channel")


@dataclass(frozen=True)
class UnitGroup:
    """The units of one hook point.

    Attributes:
        hook_name: name of the ``HookPoint`` in ``model.hook_dict``.
        axis: the activation axis that indexes the units (non-negative).
        size: number of units along ``axis``.
        layer: layer index used for per-layer statistics (``-1`` if not meaningful).
        kind: ``"head"``, ``"neuron"``, ``"channel"`` or any user label.
        feature_axes: axes that belong to one unit's *feature vector* and are therefore kept (not
            averaged) when computing a mean-ablation value; e.g. ``(3,)`` (``d_head``) for heads.
            All other axes except ``axis`` are averaged over (batch, positions, spatial dims).
    """

    hook_name: str
    axis: int
    size: int
    layer: int
    kind: str
    feature_axes: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise ValueError(
                f"UnitGroup.hook_name must be a non-empty string, got {self.hook_name!r}"
            )
        if int(self.axis) < 0:
            raise ValueError(
                f"UnitGroup.axis must be non-negative, got {self.axis} ({self.hook_name})"
            )
        if int(self.size) <= 0:
            raise ValueError(f"UnitGroup.size must be positive, got {self.size} ({self.hook_name})")
        if self.axis in tuple(self.feature_axes):
            raise ValueError(f"UnitGroup.feature_axes must not contain the unit axis {self.axis}")
        object.__setattr__(self, "feature_axes", tuple(int(a) for a in self.feature_axes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of this group."""
        d = asdict(self)
        d["feature_axes"] = list(self.feature_axes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitGroup:
        """Inverse of :meth:`to_dict`."""
        return cls(
            hook_name=str(d["hook_name"]),
            axis=int(d["axis"]),
            size=int(d["size"]),
            layer=int(d["layer"]),
            kind=str(d["kind"]),
            feature_axes=tuple(d.get("feature_axes", ())),
        )


class UnitMap:
    """An ordered collection of :class:`UnitGroup`, one per hook point."""

    def __init__(self, groups: Iterable[UnitGroup]):
        """Build a unit map from explicit groups (works for any ``HookedRootModule``)."""
        self.groups: list[UnitGroup] = list(groups)
        if not self.groups:
            raise ValueError("UnitMap needs at least one UnitGroup (got none)")
        seen: set[str] = set()
        for g in self.groups:
            if not isinstance(g, UnitGroup):
                raise ValueError(f"UnitMap expects UnitGroup objects, got {type(g).__name__}")
            if g.hook_name in seen:
                raise ValueError(f"UnitMap has two groups on the same hook {g.hook_name!r}")
            seen.add(g.hook_name)

    # ------------------------------------------------------------------ queries
    @property
    def n_units(self) -> int:
        """Total number of units over all groups."""
        return sum(g.size for g in self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitMap) and self.groups == other.groups

    def __repr__(self) -> str:
        return f"UnitMap({len(self.groups)} groups, {self.n_units} units)"

    def offsets(self) -> list[int]:
        """Start index of each group in the global (flat) unit order."""
        out, acc = [], 0
        for g in self.groups:
            out.append(acc)
            acc += g.size
        return out

    def units(self) -> list[tuple[int, str, int]]:
        """``(layer, kind, index)`` of every unit, in global order (group order, then index)."""
        return [(g.layer, g.kind, i) for g in self.groups for i in range(g.size)]

    def hook_names(self) -> list[str]:
        """Hook names of the groups, in order."""
        return [g.hook_name for g in self.groups]

    def validate(self, model: nn.Module) -> None:
        """Check that every hook exists on ``model`` (a ``HookedRootModule``).

        Unit counts are checked against the activations when the hooks fire.

        Raises:
            ValueError: naming the unknown hook.
        """
        hook_dict = getattr(model, "hook_dict", None)
        if hook_dict is None:
            raise ValueError(
                f"{type(model).__name__} is not a HookedRootModule (no hook_dict; call setup())"
            )
        for g in self.groups:
            if g.hook_name not in hook_dict:
                raise ValueError(f"unknown hook name {g.hook_name!r}: the model has no such hook")

    def group(self, hook_name: str) -> UnitGroup:
        """The group of ``hook_name`` (ValueError naming it if absent)."""
        for g in self.groups:
            if g.hook_name == hook_name:
                return g
        raise ValueError(f"the unit map has no group on hook {hook_name!r}")

    def split(self, flat: Any) -> dict[str, Any]:
        """Cut a ``[..., n_units]`` tensor into ``{hook_name: [..., size]}`` (group order)."""
        if flat.shape[-1] != self.n_units:
            raise ValueError(
                f"a per-unit tensor needs {self.n_units} entries on its last axis, got "
                f"{tuple(flat.shape)}"
            )
        out, start = {}, 0
        for g in self.groups:
            out[g.hook_name] = flat[..., start : start + g.size]
            start += g.size
        return out

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``{"groups": [...]}``)."""
        return {"groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitMap:
        """Inverse of :meth:`to_dict`."""
        if "groups" not in d:
            raise ValueError("UnitMap.from_dict: missing key 'groups'")
        return cls(UnitGroup.from_dict(g) for g in d["groups"])
