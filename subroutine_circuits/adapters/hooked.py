"""A generic adapter for any ``HookedRootModule`` with an explicit unit map.

Use it for model families without a dedicated adapter, e.g. a CNN whose units are the channels
of its blocks' outputs (``UnitGroup("stages.0.blocks.0.hook_hidden", axis=1, size=C, ...)``,
activations ``[batch, channel, h, w]``)::

    adapter = HookedModuleAdapter(cnn, unit_map, embed=lambda m, x: m(x))
    mask = UnitMask(adapter.unit_map(), MaskConfig())
    mask.set_mean(adapter, {"inputs": reference_images})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from subroutine_circuits.adapters.base import ModelAdapter, Recorded
from subroutine_circuits.masks.units import UnitMap


class HookedModuleAdapter(ModelAdapter):
    """Adapter for a ``HookedRootModule`` described by explicit pieces.

    Args:
        model: the hooked module (its ``hook_dict`` names the unit groups' hooks).
        unit_map: where the units live.
        embed: ``embed(model, x) -> [n, d]`` for the main input ``x``; default: the model's
            output flattened to ``[n, -1]``.
        encode: ``encode(stimuli) -> Tensor [n, ...]``; default: ``torch.stack`` of tensors.
        weight_names: maskable parameters for weight masks (default: none).
        init_std: std of fresh weights for ``reinit`` ablation.
        input_name: the key of the main input in input dicts (default ``"inputs"``).
    """

    family = "hooked"

    def __init__(
        self,
        model: nn.Module,
        unit_map: UnitMap,
        *,
        embed: Callable[[nn.Module, Tensor], Tensor] | None = None,
        encode: Callable[[Sequence[Any]], Tensor] | None = None,
        weight_names: Sequence[str] = (),
        init_std: float | None = None,
        input_name: str = "inputs",
    ):
        if not hasattr(model, "hook_dict"):
            raise ValueError(
                f"{type(model).__name__} is not a HookedRootModule (no hook_dict; call setup())"
            )
        super().__init__(model)
        if not isinstance(unit_map, UnitMap):
            raise ValueError(f"unit_map must be a UnitMap, got {type(unit_map).__name__}")
        unit_map.validate(model)
        self._unit_map = unit_map
        self._embed = embed
        self._encode = encode
        self._weight_names = list(weight_names)
        self._init_std = init_std
        self.input_name = input_name

    def unit_map(
        self, kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None
    ) -> UnitMap:
        """The unit map given at construction, restricted to ``kinds`` and ``layers``."""
        groups = [
            g
            for g in self._unit_map.groups
            if (kinds is None or g.kind in kinds) and (layers is None or g.layer in layers)
        ]
        if not groups:
            raise ValueError(f"no unit groups of kinds {kinds} in layers {layers}")
        return UnitMap(groups)

    def weight_names(self) -> list[str]:
        """The weight names given at construction."""
        if not self._weight_names:
            raise ValueError("this adapter was built without weight_names")
        return list(self._weight_names)

    def init_std(self) -> float | None:
        """The std given at construction."""
        return self._init_std

    def _input(self, inputs: Mapping[str, Tensor] | Tensor) -> Tensor:
        if isinstance(inputs, Tensor):
            return inputs
        if self.input_name not in inputs:
            raise ValueError(f"inputs need {self.input_name!r} (got {sorted(inputs)})")
        return inputs[self.input_name]

    def encode_stimuli(self, stimuli: Sequence[Any]) -> dict[str, Tensor]:
        """``{input_name: encode(stimuli)}`` (default: stack tensors)."""
        x = self._encode(stimuli) if self._encode is not None else torch.stack(list(stimuli))
        return {self.input_name: x}

    def embed(self, inputs: Mapping[str, Tensor] | Tensor) -> Float[Tensor, "n d"]:
        """``embed(model, x)`` or the model's output flattened per stimulus."""
        x = self._input(inputs).to(self.device)
        out = self._embed(self.model, x) if self._embed is not None else self.model(x)
        return out.reshape(out.shape[0], -1)

    @torch.no_grad()
    def record_activations(
        self, inputs: Mapping[str, Tensor] | Tensor, hook_names: Sequence[str]
    ) -> Recorded:
        """Run the model on the inputs and record ``hook_names`` (every position counts)."""
        acts: dict[str, Tensor] = {}

        def save(x: Tensor, hook) -> None:
            acts[hook.name] = x.detach()

        self.model.run_with_hooks(
            self._input(inputs).to(self.device), fwd_hooks=[(h, save) for h in hook_names]
        )
        return Recorded(acts)
