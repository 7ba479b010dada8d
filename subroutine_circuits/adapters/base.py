"""The model-adapter interface: the one place that knows a model family.

Masks, the mask search, the ablation matrix and patching act on hook points of a
``HookedRootModule``; everything that differs between model families is asked of a
:class:`ModelAdapter`:

- **units**: :meth:`~ModelAdapter.unit_map` (heads / neurons / channels) and the maskable
  weights :meth:`~ModelAdapter.weight_names` (+ :meth:`~ModelAdapter.init_std` for ``reinit``);
- **encoding**: :meth:`~ModelAdapter.encode_stimuli` turns stimuli (texts, images) into the
  model's input tensors; :meth:`~ModelAdapter.encode_problems` makes odd-one-out problems into an
  :class:`EncodedProblems` (input tensors with leading dims ``[b, 4]`` plus ``odd [b]``);
- **readout**: :meth:`~ModelAdapter.embed` (one embedding per stimulus) from which
  :meth:`~ModelAdapter.ooo_logits` scores odd-one-out problems; optionally
  :meth:`~ModelAdapter.label_logits`;
- **reference activations** for mean ablation (:meth:`~ModelAdapter.record_activations`, with
  padding and readout positions marked so that ablation can be position-aware);
- **running from a layer** for patching (:meth:`~ModelAdapter.layer_states`,
  :meth:`~ModelAdapter.run_from_layer`; adapters without ``start_at_layer`` fall back to running
  the whole model from its inputs, ``layer 0``);
- **re-initialisation** (:meth:`~ModelAdapter.reinit`) for random-init controls.

:func:`as_adapter` wraps a model in the adapter registered for its class; new families (a
TransformerLens 4 bridge, a hooked CNN) call :func:`register_adapter` from their own module.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor

from subroutine_circuits.masks.units import UnitMap

#: A readout of patching: maps ``(model, final state)`` to the metric's input.
Readout = Callable[[Any, Tensor], Tensor]


@dataclass
class EncodedProblems:
    """Odd-one-out problems as model inputs, ready for batched forward passes.

    ``inputs`` maps input names to tensors whose leading dims are ``[b, n_stimuli]`` (for text
    ``{"tokens": [b, 4, pos], "lengths": [b, 4]}``, for images ``{"images": [b, 4, 3, H, W]}``);
    ``odd[i]`` is the index of problem ``i``'s odd stimulus.
    """

    inputs: dict[str, Tensor]
    odd: Int[Tensor, " b"]

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("EncodedProblems needs at least one input tensor")
        b = int(self.odd.shape[0])
        for name, t in self.inputs.items():
            if t.dim() < 2 or t.shape[0] != b:
                raise ValueError(
                    f"input {name!r} has shape {tuple(t.shape)}; expected leading dims "
                    f"[{b}, n_stimuli]"
                )

    def __len__(self) -> int:
        return int(self.odd.shape[0])

    @property
    def n_stimuli(self) -> int:
        """Stimuli per problem (4 for odd-one-out)."""
        return int(next(iter(self.inputs.values())).shape[1])

    def to(self, device: str | torch.device) -> EncodedProblems:
        """Move all tensors to ``device``."""
        return EncodedProblems(
            {k: v.to(device) for k, v in self.inputs.items()}, self.odd.to(device)
        )

    def batch(self, idx: Tensor) -> EncodedProblems:
        """The problems at ``idx``."""
        return EncodedProblems({k: v[idx] for k, v in self.inputs.items()}, self.odd[idx])

    def flat_inputs(self) -> dict[str, Tensor]:
        """The inputs with ``[b, n_stimuli]`` flattened to ``[b * n_stimuli]``."""
        return {k: v.reshape(-1, *v.shape[2:]) for k, v in self.inputs.items()}

    # backwards-compatible views for text models
    @property
    def tokens(self) -> Tensor:
        """``inputs["tokens"]`` (text models)."""
        return self.inputs["tokens"]

    @property
    def lengths(self) -> Tensor:
        """``inputs["lengths"]`` (text models)."""
        return self.inputs["lengths"]


@dataclass
class Recorded:
    """Activations of a reference batch, for mean ablation.

    ``acts`` maps hook names to activations; ``pos_mask`` ``[batch, pos]`` marks real positions
    (None: all count); ``readout_mask`` ``[batch, pos]`` the positions the readout reads (None:
    not position-structured, e.g. a pooled or convolutional readout).
    """

    acts: dict[str, Tensor]
    pos_mask: Bool[Tensor, "batch pos"] | None = None
    readout_mask: Bool[Tensor, "batch pos"] | None = None


class ModelAdapter(ABC):
    """What the engine needs to know about one model family (see the module docstring).

    An adapter wraps one model (``adapter.model``, a ``HookedRootModule``); it holds no other
    state than the readout settings it was made with, so it is cheap to create.
    """

    family: ClassVar[str] = "abstract"
    #: whether :meth:`run_from_layer` can start at any layer (else only at layer 0 = inputs)
    can_start_at_layer: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def causal(self) -> bool:
        """Whether no position sees a later one (right padding then leaves every real
        position's output exact); False unless the adapter knows."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"

    # ------------------------------------------------------------------ identity
    @property
    def device(self) -> torch.device:
        """Device of the model's parameters (CPU for a model without parameters)."""
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def signature(self) -> dict[str, Any]:
        """Essentials of the architecture, stored with saved masks (class name + hook names)."""
        return {
            "model_class": type(self.model).__name__,
            "hook_names": sorted(getattr(self.model, "hook_dict", {}).keys()),
        }

    def freeze(self) -> ModelAdapter:
        """Put the model in eval mode with gradients off for every parameter; returns self."""
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ units and weights
    @abstractmethod
    def unit_map(
        self, kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None
    ) -> UnitMap:
        """The maskable units of ``kinds`` (default: the family's) in ``layers`` (default: all)."""

    def weight_names(self) -> list[str]:
        """Parameters that weight masks mask by default (matrices / kernels, no biases)."""
        raise NotImplementedError(f"{type(self).__name__} defines no maskable weights")

    def init_std(self) -> float | None:
        """Std of fresh weights (for ``reinit`` ablation); None if unknown."""
        return None

    def reinit(self, seed: int) -> None:
        """Re-initialise the model's weights in place (random-init controls)."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-initialise its model")

    # ------------------------------------------------------------------ stimuli and readout
    @abstractmethod
    def encode_stimuli(self, stimuli: Sequence[Any]) -> dict[str, Tensor]:
        """Model inputs for a list of stimuli: tensors with leading dim ``[n]`` (on the CPU)."""

    def encode_problems(self, problems: Sequence[Any]) -> EncodedProblems:
        """Encode odd-one-out problems (objects with ``stimuli`` and ``odd_index``)."""
        from subroutine_circuits.models.readout import flat_stimuli

        problems = list(problems)
        stimuli, n_stim = flat_stimuli(problems)
        flat = self.encode_stimuli(stimuli)
        b = len(problems)
        inputs = {k: v.reshape(b, n_stim, *v.shape[1:]) for k, v in flat.items()}
        odd = torch.tensor([p.odd_index for p in problems], dtype=torch.long)
        return EncodedProblems(inputs, odd)

    @abstractmethod
    def embed(self, inputs: Mapping[str, Tensor]) -> Float[Tensor, "n d"]:
        """One embedding per stimulus (hooks on the model fire; gradients flow)."""

    def ooo_logits(self, inputs: Mapping[str, Tensor]) -> Float[Tensor, "b n_stimuli"]:
        """Odd-one-out scores of problems whose inputs have leading dims ``[b, n_stimuli]``."""
        from subroutine_circuits.models.readout import ooo_scores

        first = next(iter(inputs.values()))
        b, k = first.shape[:2]
        emb = self.embed({name: v.reshape(b * k, *v.shape[2:]) for name, v in inputs.items()})
        return ooo_scores(emb.view(b, k, -1))

    @torch.no_grad()
    def accuracy(
        self, data: EncodedProblems, mask: Any = None, batch_size: int | None = None
    ) -> float:
        """OOO accuracy on encoded problems (under ``mask`` if given, any masks on the model).

        ``batch_size`` problems per forward pass (default: by device, ``utils.eval_batch_size``),
        at most as many as fit the worker's GPU memory budget
        (:func:`subroutine_circuits.memory.rows_per_pass`; an out-of-memory error halves the
        batch and retries); one host synchronisation at the end.
        """
        from subroutine_circuits.memory import rows_per_pass, run_chunked
        from subroutine_circuits.utils import eval_batch_size

        batch_size = eval_batch_size(self.device) if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(data) == 0:
            raise ValueError("no problems to score (empty split?)")
        ctx = mask.applied(self.model) if mask is not None else contextlib.nullcontext()
        data = data.to(self.device)
        tokens = data.inputs.get("tokens")
        if tokens is not None and tokens.dim() == 3:  # [b, n_stimuli, pos]: budget by rows
            n_stim, pos = tokens.shape[1], tokens.shape[2]
            rows = rows_per_pass(self.model, pos, batch_size * n_stim)
            batch_size = max(1, min(batch_size, rows // n_stim))

        def correct(part: range) -> Tensor:
            idx = torch.arange(part.start, part.stop, device=data.odd.device)
            chunk = data.batch(idx)
            scores = self.ooo_logits(chunk.inputs)
            return (scores.argmax(-1) == chunk.odd).sum()

        with ctx:
            counts = run_chunked(
                correct, range(len(data)), batch_size, label="problems", key="accuracy"
            )
        return int(torch.stack(counts).sum()) / len(data)

    def label_logits(self, inputs: Mapping[str, Tensor]) -> Float[Tensor, "n vocab"]:
        """Vocabulary logits at the readout position (label-token readout)."""
        raise NotImplementedError(f"{type(self).__name__} has no label-token readout")

    # ------------------------------------------------------------------ ablation reference
    @abstractmethod
    def record_activations(
        self, inputs: Mapping[str, Tensor] | Tensor, hook_names: Sequence[str]
    ) -> Recorded:
        """Run reference inputs (leading dim ``[n]``) and record ``hook_names`` activations."""

    # ------------------------------------------------------------------ patching
    @property
    def n_layers(self) -> int:
        """Number of layers :meth:`run_from_layer` can start at (``0`` = the inputs)."""
        return 0

    def check_patchable(self) -> None:  # noqa: B027 - optional hook, default: no restriction
        """Raise ValueError if patching cannot run this model."""

    #: patching readouts by name (:meth:`readout`); empty: callables only
    readouts: ClassVar[Mapping[str, Readout]] = {}

    def readout(self, name: str | Readout) -> Readout:
        """A patching readout by name from :attr:`readouts` (or a callable ``(model, final
        state)``, passed through)."""
        if callable(name):
            return name
        if name not in self.readouts:
            raise ValueError(
                f"unknown readout {name!r} for {type(self).__name__}; choose one of "
                f"{sorted(self.readouts)}"
            )
        return self.readouts[name]

    def input_state(self, inputs: Tensor) -> Tensor:
        """The state :meth:`run_from_layer` takes at layer 0 (here: the inputs themselves)."""
        return inputs

    def forward(self, inputs: Tensor, readout: Readout) -> Tensor:
        """The whole model on ``inputs`` (hooks fire), then ``readout`` of its final state."""
        return readout(self.model, self.model(inputs))

    def layer_states(
        self, inputs: Tensor, hook_names: Sequence[str], readout: Readout
    ) -> tuple[list[Tensor], dict[str, Tensor], Tensor]:
        """One forward pass: ``(states, acts, out)``.

        ``states[l]`` is the input of layer ``l`` (``states[0]`` the model input; adapters that
        cannot start at a layer return only that), ``acts`` the activations at ``hook_names``
        and ``out`` the readout of the final state.
        """
        acts: dict[str, Tensor] = {}

        def save(act: Tensor, hook: Any) -> None:
            acts[hook.name] = act.detach()

        with self.model.hooks(fwd_hooks=named_hooks(hook_names, save)):
            final = self.model(inputs)
        return [inputs], acts, readout(self.model, final).detach()

    def run_from_layer(self, state: Tensor, layer: int, readout: Readout) -> Tensor:
        """Run from ``state`` (the input of ``layer``) to the end and apply ``readout``.

        Hooks on the model fire. The fallback runs the whole model from its inputs (layer 0).
        """
        if layer != 0:
            raise ValueError(f"{type(self).__name__} can only run from its inputs (layer 0)")
        return readout(self.model, self.model(state))

    def layer_of(self, group_layer: int) -> int:
        """The layer :meth:`run_from_layer` starts at to patch a unit of ``group_layer``."""
        return group_layer if self.can_start_at_layer else 0


# ---------------------------------------------------------------------------------- hook names


class _NamedHook:
    """A hook point seen under the name it was requested by (``name``); all else delegates."""

    def __init__(self, hook: Any, name: str):
        self._hook = hook
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._hook, attr)


def named_hooks(names: Sequence[str], fn: Callable[[Tensor, Any], Any]) -> list[tuple[str, Any]]:
    """``fwd_hooks`` that call ``fn(act, hook)`` with ``hook.name`` equal to the requested name.

    TransformerLens 4 bridges alias hook points (``blocks.0.attn.hook_z`` is the hook point
    named ``blocks.0.attn.o.hook_in``), so code that keys activations by ``hook.name`` must use
    these hooks to get the names it asked for.
    """

    def call(act: Tensor, hook: Any, name: str) -> Any:
        return fn(act, _NamedHook(hook, name))

    return [(n, functools.partial(call, name=n)) for n in names]


# ---------------------------------------------------------------------------------- registry

_REGISTRY: list[tuple[Callable[[Any], bool], Callable[..., ModelAdapter]]] = []


def register_adapter(matches: Callable[[Any], bool], factory: Callable[..., ModelAdapter]) -> None:
    """Make :func:`as_adapter` wrap models for which ``matches(model)`` holds with ``factory``.

    Later registrations take precedence (a more specific adapter registered by a new family).
    ``factory(model, **options)`` builds the adapter.
    """
    _REGISTRY.insert(0, (matches, factory))


def registered_adapters() -> list[tuple[Callable[[Any], bool], Callable[..., ModelAdapter]]]:
    """The registered ``(matches, factory)`` pairs, most recent first."""
    return list(_REGISTRY)
