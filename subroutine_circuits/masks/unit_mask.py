"""Unit masks: hooks that mix every unit with its ablation value, ``x' = m*x + (1-m)*a``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from functools import partial

import torch
import torch.nn as nn
from jaxtyping import Bool
from torch import Tensor

from ._base import MaskBase, hybridmethod
from .ablation import current_readout_positions, mix, reference_mean, unit_shape
from .parametrization import Ablation, MaskConfig
from .units import UnitGroup, UnitMap


def add_owned_hook(model: nn.Module, hook_name: str, fn) -> tuple:
    """Add ``fn`` as a forward hook on ``model.hook_dict[hook_name]``; return a removal token.

    The hook is added as *permanent* so that a ``model.reset_hooks()`` issued by other code inside
    a ``with mask.applied(model):`` block does not silently drop the mask; it is removed by
    :func:`remove_owned_hook` (and only that one hook).
    """
    hp = model.hook_dict[hook_name]
    hp.add_hook(fn, dir="fwd", is_permanent=True)
    handle = None
    for h in reversed(hp.fwd_hooks):
        if getattr(h, "user_hook", None) is fn:
            handle = h
            break
    if handle is None:  # older TransformerLens without user_hook: ours is the last one
        handle = hp.fwd_hooks[-1]
    return hp, handle


def remove_owned_hook(token: tuple) -> None:
    """Remove exactly the hook added by :func:`add_owned_hook` (others stay)."""
    hp, handle = token
    handle.hook.remove()
    for i, h in enumerate(hp.fwd_hooks):
        if h is handle:
            del hp.fwd_hooks[i]
            break


class UnitMask(MaskBase):
    """A mask over the units of a :class:`UnitMap`, applied through forward hooks.

    In ``train()`` mode the hooks use the soft / stochastic mask (a fresh hard-concrete sample
    each time a hook fires), in ``eval()`` mode the deterministic binary mask. The ablation value
    ``a`` is zero, the per-unit mean over a reference batch (:meth:`set_mean`) or the
    activation of a corrupted run (:meth:`set_resample`).

    Example::

        adapter = as_adapter(model)  # subroutine_circuits.adapters
        mask = UnitMask(adapter.unit_map(), MaskConfig(parametrization="hard_concrete"))
        with mask.applied(model):
            logits = model(tokens)
    """

    def __init__(
        self,
        unit_map: UnitMap,
        cfg: MaskConfig | None = None,
        *,
        fixed: Bool[Tensor, "n_units"] | None = None,
        generator: torch.Generator | None = None,
    ):
        """Create a trainable mask (or, with ``fixed``, a constant one; see :meth:`fixed`).

        Hard-concrete samples come from ``generator`` (default: seeded with ``cfg.seed``).
        """
        super().__init__()
        if not isinstance(unit_map, UnitMap):
            raise ValueError(f"UnitMask needs a UnitMap, got {type(unit_map).__name__}")
        self.cfg = cfg if cfg is not None else MaskConfig()
        self.ablation = Ablation.parse(self.cfg.ablation)
        if self.ablation == Ablation.REINIT:
            raise ValueError("ablation 'reinit' applies to weight masks; use zero/mean/resample")
        self.unit_map = unit_map
        self.labels = [f"unit group {g.hook_name!r}" for g in unit_map.groups]
        self.layers = [g.layer for g in unit_map.groups]
        self.kinds = [g.kind for g in unit_map.groups]
        self._build_parts([(g.size,) for g in unit_map.groups], self.cfg, fixed, generator)
        # hook_name -> ablation tensor (mean: broadcastable, keepdim; resample: full shape)
        self.ablation_values: dict[str, Tensor] = {}
        # position-aware mean ablation: hook_name -> mean over readout positions (else empty)
        self.readout_values: dict[str, Tensor] = {}
        self.meta: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def fixed(
        cls,
        unit_map: UnitMap,
        flat_bool: Bool[Tensor, "n_units"],
        ablation: str | Ablation = "zero",
    ) -> UnitMask:
        """A non-trainable mask keeping exactly the units where ``flat_bool`` is True."""
        return cls(unit_map, MaskConfig(ablation=Ablation.parse(ablation).value), fixed=flat_bool)

    def _fixed_copy(self, flat_bool: Bool[Tensor, "n_units"]) -> UnitMask:
        """A fixed mask on the same unit map with the same ablation (values copied)."""
        out = UnitMask.fixed(self.unit_map, flat_bool, self.ablation)
        out.ablation_values = {k: v.clone() for k, v in self.ablation_values.items()}
        out.readout_values = {k: v.clone() for k, v in self.readout_values.items()}
        return out

    def complement(self) -> UnitMask:
        """Fixed mask keeping exactly the units this mask removes (same ablation values)."""
        return self._fixed_copy(~self.flat_binary())

    def fixed_like(
        self, flat_bool: Bool[Tensor, "n_units"], ablation: str | Ablation | None = None
    ) -> UnitMask:
        """A fixed mask on this mask's unit map (ablation default: this mask's; values copied
        when the ablation kind is the same)."""
        abl = self.ablation if ablation is None else Ablation.parse(ablation)
        if abl == self.ablation:
            return self._fixed_copy(flat_bool)
        return UnitMask.fixed(self.unit_map, flat_bool, abl)

    @hybridmethod
    def random_like(mask: UnitMask, seed: int, per_group: bool = False) -> UnitMask:
        """A fixed random mask keeping as many units as ``mask``'s binary mask.

        Call as ``UnitMask.random_like(mask, seed)`` or ``mask.random_like(seed)``. With
        ``per_group=False`` (default) the same *total* number of units is kept, chosen
        uniformly among all units of the unit map; with ``per_group=True`` the count is matched
        within every group (hook). Ablation kind and values are copied from ``mask``.
        """
        return mask._fixed_copy(mask._random_flat(seed, per_group))

    # ------------------------------------------------------------------ queries
    def binary(self) -> dict[str, Bool[Tensor, "units"]]:
        """Deterministic binary mask per hook name."""
        return {g.hook_name: p.binary() for g, p in zip(self.unit_map.groups, self.parts)}

    # ------------------------------------------------------------------ ablation values
    def set_mean_from_activations(
        self,
        acts: Mapping[str, Tensor],
        pos_mask: Bool[Tensor, "batch pos"] | None = None,
        readout_mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> None:
        """Mean ablation values from recorded activations ``{hook_name: tensor}``.

        Per unit, the mean runs over every axis except the unit axis and the group's
        ``feature_axes`` (batch and positions for heads/neurons, batch and space for CNN
        channels); see :func:`~subroutine_circuits.masks.ablation.reference_mean`. ``pos_mask``
        (``[batch, pos]``, True = real token) excludes padding.

        ``readout_mask`` (``[batch, pos]``, True = the position the readout reads) makes the
        ablation *position-aware*: readout positions get the mean over readout positions and
        every other position the mean over the other real positions. At run time the adapter
        marks the readout positions of each forward pass (``ablation.readout_positions``).
        """
        values, readout_values = {}, {}
        for g in self.unit_map.groups:
            if g.hook_name not in acts:
                raise ValueError(f"no activations for hook {g.hook_name!r} to compute the mean")
            x = acts[g.hook_name]
            self._check_unit_axis(g, x)
            if readout_mask is None:
                values[g.hook_name] = reference_mean(g, x, pos_mask)
                continue
            ro = torch.as_tensor(readout_mask).bool().to(x.device)
            real = ro.new_ones(ro.shape) if pos_mask is None else torch.as_tensor(pos_mask).bool()
            real = real.to(x.device)
            values[g.hook_name] = reference_mean(g, x, real & ~ro)
            readout_values[g.hook_name] = reference_mean(g, x, real & ro)
        self.ablation_values = values
        self.readout_values = readout_values

    @torch.no_grad()
    def set_mean(
        self,
        source,
        inputs: Mapping[str, Tensor] | Tensor,
        *,
        position_aware: bool = False,
    ) -> None:
        """Store per-unit means over reference ``inputs`` (run without any mask) as ablation values.

        ``source`` is a model adapter (``subroutine_circuits.adapters.as_adapter(model)``): it
        encodes how its family runs a batch of reference inputs, which positions are padding
        (excluded from the mean) and which are read out. ``inputs`` is the adapter's input dict
        with leading axis ``[n]`` (e.g. ``{"tokens": ..., "lengths": ...}``), or a tensor
        (the adapter's main input). ``position_aware=True`` stores separate means for readout
        positions and other positions (see :meth:`set_mean_from_activations`).
        """
        if not hasattr(source, "record_activations"):
            raise ValueError(
                f"set_mean needs a model adapter, got {type(source).__name__}; wrap the model "
                "with subroutine_circuits.adapters.as_adapter(model)"
            )
        self.unit_map.validate(source.model)
        rec = source.record_activations(inputs, self.unit_map.hook_names())
        self.set_mean_from_activations(
            rec.acts, rec.pos_mask, rec.readout_mask if position_aware else None
        )

    def set_resample(self, cache: Mapping[str, Tensor]) -> None:
        """Resample ablation: ``a`` = activations recorded on a corrupted input.

        ``cache`` maps every hook of the unit map to a tensor of the activation's full shape;
        the masked run must use inputs of the same shape.
        """
        values = {}
        for g in self.unit_map.groups:
            if g.hook_name not in cache:
                raise ValueError(f"set_resample: no activations for hook {g.hook_name!r}")
            x = cache[g.hook_name].detach()
            self._check_unit_axis(g, x)
            values[g.hook_name] = x
        self.ablation_values = values
        self.readout_values = {}

    @staticmethod
    def _check_unit_axis(g: UnitGroup, x: Tensor) -> None:
        """Raise if ``x`` has no axis ``g.axis`` of size ``g.size``."""
        if x.dim() <= g.axis or x.shape[g.axis] != g.size:
            raise ValueError(
                f"activation at {g.hook_name!r} has shape {tuple(x.shape)}; expected size "
                f"{g.size} on axis {g.axis}"
            )

    # ------------------------------------------------------------------ application
    def _mix(self, idx: int, x: Tensor, hook=None) -> Tensor:
        """The hook function for group ``idx``: ``m*x + (1-m)*a`` (:func:`ablation.mix`)."""
        g = self.unit_map.groups[idx]
        part = self.parts[idx]
        self._check_unit_axis(g, x)
        part.check_finite(self.labels[idx])
        m = part().to(device=x.device, dtype=x.dtype).reshape(unit_shape(g, x.dim()))
        if self.ablation == Ablation.ZERO:
            return mix(x, m)
        a = self.ablation_values[g.hook_name].to(device=x.device, dtype=x.dtype)
        if self.ablation == Ablation.RESAMPLE and tuple(a.shape) != tuple(x.shape):
            raise ValueError(
                f"resample activations for {g.hook_name!r} have shape {tuple(a.shape)}, the "
                f"masked run has {tuple(x.shape)}"
            )
        ro = current_readout_positions() if g.hook_name in self.readout_values else None
        if ro is not None:
            if tuple(ro.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"readout positions {tuple(ro.shape)} do not match the batch/pos axes of "
                    f"{g.hook_name!r} activations {tuple(x.shape)}"
                )
            a_ro = self.readout_values[g.hook_name].to(device=x.device, dtype=x.dtype)
            sel = ro.to(x.device).reshape(*ro.shape, *([1] * (x.dim() - 2)))
            a = torch.where(sel, a_ro, a)
        return mix(x, m, a)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[UnitMask]:
        """Context manager: the mask's hooks are on ``model`` inside the block.

        Only the hooks added here are removed on exit (also on exceptions); other hooks on the
        model (e.g. a padding hook on ``hook_attn_scores``) keep working alongside.
        """
        self.unit_map.validate(model)
        self.check_finite()
        if self.ablation != Ablation.ZERO:
            missing = [
                g.hook_name for g in self.unit_map.groups if g.hook_name not in self.ablation_values
            ]
            if missing:
                how = "set_mean(...)" if self.ablation == Ablation.MEAN else "set_resample(...)"
                raise ValueError(
                    f"{self.ablation.value} ablation values missing for {missing}; call {how} first"
                )
        tokens = []
        try:
            for i, g in enumerate(self.unit_map.groups):
                tokens.append(add_owned_hook(model, g.hook_name, partial(self._mix, i)))
            yield self
        finally:
            for t in tokens:
                remove_owned_hook(t)
