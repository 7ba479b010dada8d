"""The adapter of the hooked ResNet-style CNN (:class:`~subroutine_circuits.models.cnn.HookedCNN`).

Units (:func:`~subroutine_circuits.models.cnn.cnn_unit_groups`): ``"channel"`` groups on axis 1
of ``[n, c, h, w]`` (the stem's channels and every block's hidden channels) and the head's
hidden ``"neuron"`` group on axis 1 of ``[n, d_hidden]``. A group's ``layer`` is the ordinal of
its hook in forward order (0 = the stem, then every hidden hook, the head last); the residual
stream (``hook_out``) is never a unit group, so with every unit ablated no input information
reaches the embedding (the bypass check). Maskable weights
(:func:`~subroutine_circuits.models.cnn.cnn_weight_names`): every conv kernel (the 1x1 shortcut
convs included) and both head Linear weights; never biases or norms.

Stimuli are image tensors ``[3, h, w]`` (normalised) or uint8 ``[h, w, 3]`` arrays; odd-one-out
problems are a shape-world :class:`~subroutine_circuits.tasks.vision.ImageProblems` (or objects
with ``stimuli`` and ``odd_index``) and encode to ``{"images": [b, 4, 3, h, w]}``. The readout
is the embedding (``hook_embed``), pooled over space, so there are no positions: mean ablation
averages a channel over images and space, and :meth:`CNNAdapter.record_activations` returns
``readout_mask=None``.

Patching can start at any unit layer (:attr:`CNNAdapter.can_start_at_layer`): the state of a
block's layers is the block's input, that of the head layer the pooled vector, so patching a unit
reruns only the network after it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from subroutine_circuits.adapters.base import ModelAdapter, Readout, Recorded, register_adapter
from subroutine_circuits.masks.units import UnitGroup, UnitMap

#: Unit kinds of a CNN.
CNN_UNIT_KINDS = ("channel", "neuron")
#: Most images per forward pass on the CPU (``record_activations``, ``accuracy``, batched
#: fixed masks, mask training): larger batches of small images spill the caches and run up to
#: 2-3 times slower per image (measured on the ``cpu`` preset at 32 px, one thread).
CPU_ROWS = 128
#: Default images per forward pass of ``record_activations`` on accelerators.
RECORD_BATCH_DEVICE = 1024
#: ``CNNConfig`` fields stored in a mask's model signature.
SIGNATURE_FIELDS = (
    "in_channels", "stem_channels", "stem_kernel", "stem_stride", "stem_pool", "block",
    "stage_widths", "stage_channels", "stage_blocks", "stage_strides", "d_hidden", "d_embed",
)  # fmt: skip


def is_hooked_cnn(model: Any) -> bool:
    """Whether ``model`` is a :class:`~subroutine_circuits.models.cnn.HookedCNN`."""
    return type(model).__name__ == "HookedCNN" and hasattr(model, "stages")


def embed_readout(model: nn.Module, emb: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """The embedding itself (the final state of a CNN is its embedding)."""
    return emb


READOUTS: dict[str, Readout] = {"embed": embed_readout}


class CNNAdapter(ModelAdapter):
    """Adapter for :class:`~subroutine_circuits.models.cnn.HookedCNN`.

    Args:
        model: the CNN.
        stages: 0-based stages whose blocks are masked (default: all; with some stages only, the
            stem is left out and the head's neurons are the cut, see ``cnn_unit_groups``).
        include_stem: mask the stem's channels (default: when every stage is masked).
        include_head: mask the head's hidden neurons (default True).
        batch_size: images per forward pass of :meth:`record_activations` (default
            :data:`CPU_ROWS` on the CPU, where larger batches only spill the caches and run
            slower per image, :data:`RECORD_BATCH_DEVICE` on accelerators).

    ``cpu_rows`` (:data:`CPU_ROWS`) is the most images per forward pass on the CPU that the
    batched mask engine (fixed-mask scores, mask training) and :meth:`accuracy` use.
    """

    cpu_rows: int = CPU_ROWS

    family = "cnn"
    readouts = READOUTS
    can_start_at_layer = True

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[int] | None = None,
        include_stem: bool | None = None,
        include_head: bool = True,
        batch_size: int | None = None,
    ):
        if not is_hooked_cnn(model):
            raise ValueError(f"CNNAdapter needs a HookedCNN, got {type(model).__name__}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(model)
        self.stages = None if stages is None else [int(s) for s in stages]
        self.include_stem = include_stem
        self.include_head = include_head
        self.batch_size = None if batch_size is None else int(batch_size)

    # ------------------------------------------------------------------ identity / units
    def signature(self) -> dict[str, Any]:
        """``model_class`` and the architecture fields of the CNN's config."""
        d = self.model.cfg.to_dict()
        return {"model_class": type(self.model).__name__, **{f: d[f] for f in SIGNATURE_FIELDS}}

    def unit_map(
        self, kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None
    ) -> UnitMap:
        """Channel and/or neuron groups (``kinds``; default both) at the hook ordinals
        ``layers`` (default all) among the adapter's stages."""
        from subroutine_circuits.models.cnn import cnn_unit_groups

        kinds = CNN_UNIT_KINDS if kinds is None else tuple(kinds)
        bad = [k for k in kinds if k not in CNN_UNIT_KINDS]
        if bad or not kinds:
            raise ValueError(
                f"unknown unit kind {bad[0] if bad else '(none)'!r} for a CNN; use "
                f"{' and/or '.join(repr(k) for k in CNN_UNIT_KINDS)}"
            )
        groups = cnn_unit_groups(self.model, self.stages, self.include_stem, self.include_head)
        if layers is not None:
            known = {g.layer for g in groups}
            unknown = sorted({int(x) for x in layers} - known)
            if unknown:
                raise ValueError(
                    f"layer {unknown[0]} is not a unit layer of this CNN selection; unit layers "
                    f"(hook ordinals): {sorted(known)}"
                )
        chosen = [
            g for g in groups if g.kind in kinds and (layers is None or g.layer in set(layers))
        ]
        if not chosen:
            raise ValueError(f"no CNN unit groups of kinds {kinds} in layers {layers}")
        return UnitMap(chosen)

    def weight_names(self) -> list[str]:
        """Conv kernels (shortcut convs included) and head Linear weights of the stages."""
        from subroutine_circuits.models.cnn import cnn_weight_names

        return cnn_weight_names(self.model, self.stages, self.include_stem, self.include_head)

    def reinit_values(self, param_names: Sequence[str], seed: int) -> dict[str, Tensor]:
        """Fresh kaiming values per weight (each layer has its own scale) for ``reinit``."""
        from subroutine_circuits.models.cnn import cnn_reinit_values

        return cnn_reinit_values(self.model, param_names, seed)

    def reinit(self, seed: int) -> None:
        """Kaiming re-initialisation of every parameter (the ``random_init`` control)."""
        from subroutine_circuits.models.cnn import reinit_cnn

        reinit_cnn(self.model, seed)

    # ------------------------------------------------------------------ stimuli and readout
    def encode_stimuli(self, stimuli: Sequence[Any]) -> dict[str, Tensor]:
        """``{"images": [n, 3, h, w]}`` from float tensors ``[3, h, w]`` (normalised) or uint8
        arrays ``[h, w, 3]`` (normalised here as the shape world's images)."""
        from subroutine_circuits.tasks.vision.task import images_to_tensor

        stimuli = list(stimuli)
        if not stimuli:
            raise ValueError("no stimuli to encode")
        if isinstance(stimuli[0], np.ndarray):
            arr = np.stack(stimuli)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(
                    f"image arrays must be uint8 [h, w, 3], got {arr.dtype} {arr.shape[1:]}"
                )
            return {"images": images_to_tensor(arr)}
        x = torch.stack([torch.as_tensor(s) for s in stimuli])
        if x.ndim != 4 or not x.dtype.is_floating_point:
            raise ValueError(
                f"image tensors must be float [c, h, w], got {x.dtype} {tuple(x.shape[1:])}"
            )
        return {"images": x}

    def encode_problems(self, problems: Any):
        """Encode a shape-world ``ImageProblems`` (``to_tensor()`` / ``odd_tensor()``) or a
        sequence of problems with ``stimuli`` and ``odd_index``."""
        from subroutine_circuits.adapters.base import EncodedProblems

        if hasattr(problems, "to_tensor") and hasattr(problems, "odd_tensor"):
            if len(problems) == 0:
                raise ValueError("no problems to encode (empty split?)")
            return EncodedProblems({"images": problems.to_tensor()}, problems.odd_tensor())
        return super().encode_problems(problems)

    @staticmethod
    def _images(inputs: Mapping[str, Tensor] | Tensor) -> Tensor:
        if isinstance(inputs, Tensor):
            return inputs
        if "images" not in inputs:
            raise ValueError(f"CNN inputs need 'images' (got {sorted(inputs)})")
        return inputs["images"]

    def embed(self, inputs: Mapping[str, Tensor] | Tensor) -> Float[Tensor, "n d_embed"]:
        """The CNN's embeddings of ``images [n, 3, h, w]`` (hooks and masks fire)."""
        return self.model(self._images(inputs).to(self.device))

    @torch.no_grad()
    def accuracy(self, data: Any, mask: Any = None, batch_size: int | None = None) -> float:
        """OOO accuracy (see :meth:`ModelAdapter.accuracy`); on the CPU every forward pass holds
        at most :attr:`cpu_rows` images whatever ``batch_size`` says (each image is scored on
        its own, so the result does not depend on the batching)."""
        if self.device.type == "cpu" and len(data):
            n_stim = int(next(iter(data.inputs.values())).shape[1])
            most = max(1, self.cpu_rows // n_stim)
            batch_size = most if batch_size is None else min(int(batch_size), most)
        return super().accuracy(data, mask, batch_size)

    # ------------------------------------------------------------------ ablation reference
    @torch.no_grad()
    def record_activations(
        self, inputs: Mapping[str, Tensor] | Tensor, hook_names: Sequence[str]
    ) -> Recorded:
        """Run reference images in batches and record ``hook_names``.

        Conv activations ``[n, c, h, w]`` are returned averaged over space (``[n, c, 1, 1]``):
        mean ablation averages a channel over images and space, which this preserves exactly
        (every image has the same size), and memory stays bounded for large models.
        """
        images = self._images(inputs)
        parts: dict[str, list[Tensor]] = {h: [] for h in hook_names}

        def save(x: Tensor, hook) -> None:
            v = x.detach()
            parts[hook.name].append(v.mean(dim=(2, 3), keepdim=True) if v.ndim == 4 else v)

        hooks = [(h, save) for h in hook_names]
        bs = self.batch_size or (CPU_ROWS if self.device.type == "cpu" else RECORD_BATCH_DEVICE)
        for start in range(0, images.shape[0], bs):
            chunk = images[start : start + bs].to(self.device)
            self.model.run_with_hooks(chunk, fwd_hooks=hooks)
        return Recorded({h: torch.cat(v) for h, v in parts.items()})

    # ------------------------------------------------------------------ patching
    def _pieces(self) -> list[tuple[list[int], Callable[[Tensor], Tensor]]]:
        """The network as consecutive pieces ``(unit layers inside, fn)``: the stem, every block,
        then pooling + head. A piece's input is the state of each of its layers."""
        from subroutine_circuits.models.cnn import cnn_layer_table

        model = self.model
        table = cnn_layer_table(model)
        by_block: dict[tuple[int, int], list[int]] = {}
        for r in table:
            if r["stage"] >= 0:
                by_block.setdefault((r["stage"], r["block"]), []).append(r["layer"])

        def stem(x: Tensor) -> Tensor:
            model._check_images(x)
            return model.stem(x)

        pieces: list[tuple[list[int], Callable[[Tensor], Tensor]]] = [([0], stem)]
        blocks = model.blocks()
        for i, (s, b, blk) in enumerate(blocks):
            if i == len(blocks) - 1:

                def last(x: Tensor, blk=blk) -> Tensor:
                    return model.hook_pooled(blk(x).mean(dim=(2, 3)))

                pieces.append((by_block[(s, b)], last))
            else:
                pieces.append((by_block[(s, b)], blk))
        pieces.append(([table[-1]["layer"]], lambda p: model.hook_embed(model.head(p))))
        return pieces

    @property
    def n_layers(self) -> int:
        """Number of unit layers (hook ordinals) :meth:`run_from_layer` can start at."""
        from subroutine_circuits.models.cnn import cnn_layer_table

        return len(cnn_layer_table(self.model))

    def input_state(self, inputs: Tensor) -> Tensor:
        """The images (on the model's device)."""
        return self._images(inputs).to(self.device)

    def forward(self, inputs: Tensor, readout: Readout) -> Tensor:
        """The whole CNN on ``images`` (hooks fire), then ``readout`` of the embedding."""
        return readout(self.model, self.model(self.input_state(inputs)))

    def layer_states(
        self, inputs: Tensor, hook_names: Sequence[str], readout: Readout
    ) -> tuple[list[Tensor], dict[str, Tensor], Tensor]:
        """The input of every unit layer, the activations at ``hook_names`` and the output."""
        acts: dict[str, Tensor] = {}

        def save(act: Tensor, hook: Any) -> None:
            acts[hook.name] = act.detach()

        states: dict[int, Tensor] = {}
        x = self.input_state(inputs)
        with self.model.hooks(fwd_hooks=[(h, save) for h in hook_names]):
            for layers, fn in self._pieces():
                for layer in layers:
                    states[layer] = x.detach()
                x = fn(x)
        out = readout(self.model, x).detach()
        return [states[i] for i in range(len(states))], acts, out

    def run_from_layer(self, state: Tensor, layer: int, readout: Readout) -> Tensor:
        """Run the pieces from the one holding unit layer ``layer`` on ``state`` (its input),
        then ``readout``. Layer 0 runs the whole model (root-module hooks fire)."""
        if layer == 0:
            return self.forward(state, readout)
        pieces = self._pieces()
        starts = [i for i, (layers, _) in enumerate(pieces) if layer in layers]
        if not starts:
            raise ValueError(f"layer {layer} out of range: the CNN has {self.n_layers} unit layers")
        x = state
        for _, fn in pieces[starts[0] :]:
            x = fn(x)
        return readout(self.model, x)


def cnn_adapter(model: nn.Module, **options: Any) -> CNNAdapter:
    """``CNNAdapter(model, **options)`` (the factory :func:`as_adapter` uses)."""
    return CNNAdapter(model, **options)


def unit_group_of(adapter: CNNAdapter, hook_name: str) -> UnitGroup:
    """The unit group of ``hook_name`` in the adapter's full unit map."""
    for g in adapter.unit_map().groups:
        if g.hook_name == hook_name:
            return g
    raise ValueError(f"{hook_name!r} is not a unit hook of this CNN")


register_adapter(is_hooked_cnn, cnn_adapter)
