"""The ablation of a mask experiment as one object: what a removed unit is replaced with.

An :class:`Ablator` is chosen once, before any run, and serves every batched forward pass that
removes units (mask training, the subnetwork alone, its removal, random controls, the bypass
check), so that all conditions are ablated the same way.

- ``"zero"``: the unit's activation becomes 0.
- ``"mean"``: the unit's mean over a reference set; *position-aware* when the readout reads one
  position (the last real token): the readout position takes the mean over readout positions of
  the reference stimuli, every other position the mean over their other real positions.
- ``"resample"``: the unit's activation on another stimulus of the reference set, drawn at
  random per evaluated stimulus (of the same length when there is one; positions aligned, the
  readout position to the source's readout position), recorded in a clean (unmasked) pass.

Why mean ablation is the default (see docs/RESULTS.md): zero is not a value a unit takes on the
data, so zeroing removes the unit's average contribution as well as its information and pushes
later layers off their input distribution; the mean keeps the average and removes only what
varies with the input (Wang et al. 2022, the IOI circuit, use mean ablation for this reason;
Conmy et al. 2023, ACDC, discuss how the choice of corruption changes the circuits found).
Resampling keeps the whole distribution but adds the noise of one draw. The mean is taken
position-aware because the readout position of a causal transformer has a different
activation distribution from the rest of the sentence.

The batched hooks call :meth:`Ablator.value` with the state made by :meth:`Ablator.begin` for
the current forward pass (readout positions, recorded resample activations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .units import UnitGroup, UnitMap

ABLATIONS = ("zero", "mean", "resample")


@dataclass
class AblationState:
    """What one forward pass needs to ablate: ``k`` (mask slices), ``ro`` readout positions
    ``[k or 1, n, pos]`` (mean, position-aware), ``acts`` resample activations per hook
    ``[k or 1, n, pos, ...]``; ``recording`` is True while the resample source pass runs."""

    k: int
    ro: Bool[Tensor, "k n pos"] | None = None
    acts: dict[str, Tensor] = field(default_factory=dict)
    recording: bool = False


@dataclass
class Ablator:
    """How removed units are replaced (see the module docstring).

    Attributes:
        kind: ``"zero"``, ``"mean"`` or ``"resample"``.
        values: mean ablation: per hook the mean over (non-readout) positions, keepdim.
        readout_values: mean ablation, position-aware: per hook the mean over readout
            positions (empty: one mean for all positions).
        source_tokens, source_lengths: resample: the reference stimuli ``[N, pos]``, ``[N]``.
        seed: resample: seeds the draw of source stimuli.
    """

    kind: str = "zero"
    values: dict[str, Tensor] = field(default_factory=dict)
    readout_values: dict[str, Tensor] = field(default_factory=dict)
    source_tokens: Int[Tensor, "N pos"] | None = None
    source_lengths: Int[Tensor, " N"] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.kind!r}; choose one of {list(ABLATIONS)}")
        if self.kind == "resample" and (self.source_tokens is None or self.source_lengths is None):
            raise ValueError("resample ablation needs source_tokens and source_lengths")
        self._gen: torch.Generator | None = None
        self._by_len: dict[int, Tensor] | None = None

    # ------------------------------------------------------------------ construction
    def to(self, device: str | torch.device) -> Ablator:
        """A copy with every tensor on ``device``."""
        move = {k: v.to(device) for k, v in self.values.items()}
        ro = {k: v.to(device) for k, v in self.readout_values.items()}
        tok = None if self.source_tokens is None else self.source_tokens.to(device)
        ln = None if self.source_lengths is None else self.source_lengths.to(device)
        return Ablator(self.kind, move, ro, tok, ln, self.seed)

    @property
    def position_aware(self) -> bool:
        """Whether readout positions get their own mean."""
        return bool(self.readout_values)

    def check(self, unit_map: UnitMap) -> None:
        """Raise ValueError if mean values are missing for a hook of ``unit_map``."""
        if self.kind != "mean":
            return
        missing = [g.hook_name for g in unit_map.groups if g.hook_name not in self.values]
        if missing:
            raise ValueError(f"mean ablation values missing for {missing}")

    # ------------------------------------------------------------------ per forward pass
    def begin(
        self,
        tokens: Int[Tensor, "rows pos"],
        lengths: Int[Tensor, " rows"],
        k: int,
        shared: bool,
        record=None,
    ) -> AblationState:
        """The state of one forward pass over ``tokens`` (right-padded rows, already trimmed).

        ``shared``: the rows are one slice that all ``k`` masks see (fixed-mask evaluation);
        else the rows are the ``k`` slices themselves (training). ``record(tokens, lengths)``
        runs a clean pass and returns ``{hook: activation}`` (resample only).
        """
        slices = 1 if shared else k
        rows, pos = tokens.shape
        state = AblationState(k=k)
        if self.kind == "mean" and self.position_aware:
            ro = torch.arange(pos, device=lengths.device)[None, :] == (lengths[:, None] - 1)
            state.ro = ro.view(slices, rows // slices, pos)
        elif self.kind == "resample":
            if record is None:
                raise ValueError("resample ablation needs a recording pass")
            src_tok, src_len, src_pos = self._draw_sources(lengths, pos)
            acts = record(src_tok, src_len)
            for h, a in acts.items():
                idx = src_pos.view(*src_pos.shape, *([1] * (a.dim() - 2))).expand(
                    -1, -1, *a.shape[2:]
                )
                state.acts[h] = a.gather(1, idx).view(slices, rows // slices, pos, *a.shape[2:])
        return state

    def _draw_sources(
        self, lengths: Int[Tensor, " rows"], pos: int
    ) -> tuple[Tensor, Tensor, Int[Tensor, "rows pos"]]:
        """Source stimuli for resampling (same length when possible) and position alignment."""
        src_len_all = self.source_lengths
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(int(self.seed))
            lens = src_len_all.cpu()
            self._by_len = {int(v): (lens == v).nonzero().flatten() for v in lens.unique()}
        avail = torch.tensor(sorted(self._by_len))
        want = lengths.cpu()
        pick = torch.empty(len(want), dtype=torch.long)
        for v in want.unique().tolist():
            near = int(avail[(avail - v).abs().argmin()])
            pool = self._by_len[near]
            rows = (want == v).nonzero().flatten()
            pick[rows] = pool[torch.randint(len(pool), (len(rows),), generator=self._gen)]
        pick = pick.to(src_len_all.device)
        src_len = src_len_all[pick]
        width = int(src_len.max())
        src_tok = self.source_tokens[pick, :width]
        p = torch.arange(pos, device=lengths.device)[None, :]
        last, s_last = (lengths - 1)[:, None], (src_len - 1)[:, None].to(lengths.device)
        src_pos = torch.where(p == last, s_last, torch.minimum(p, (s_last - 1).clamp(min=0)))
        return src_tok, src_len, src_pos.clamp(0, width - 1)

    def value(
        self, group: UnitGroup, x: Float[Tensor, "rows ..."], state: AblationState | None
    ) -> Tensor | None:
        """The replacement of ``group``'s units for ``mix_slices`` (None: zero)."""
        if self.kind == "zero":
            return None
        if self.kind == "resample":
            return state.acts[group.hook_name]
        v = self.values[group.hook_name].to(device=x.device, dtype=x.dtype)[None]
        if state is None or state.ro is None or group.hook_name not in self.readout_values:
            return v
        r = self.readout_values[group.hook_name].to(device=x.device, dtype=x.dtype)[None]
        sel = state.ro.view(*state.ro.shape, *([1] * (x.dim() - 2)))
        return torch.where(sel, r, v)

    def readout_value(self, group: UnitGroup, x: Float[Tensor, "rows ..."]) -> Tensor | None:
        """The replacement of ``group``'s units in a pass that computes their hook at the
        readout position only (one position per row): what :meth:`value` gives at readout
        positions (None: zero). Resample ablation has no such pass (its sources are aligned
        position by position)."""
        if self.kind == "zero":
            return None
        if self.kind == "resample":
            raise ValueError("resample ablation runs every position (no readout-only pass)")
        table = self.readout_values if group.hook_name in self.readout_values else self.values
        return table[group.hook_name].to(device=x.device, dtype=x.dtype)[None]


def reference_ablator(
    adapter: Any,
    unit_map: UnitMap,
    inputs: Mapping[str, Tensor],
    kind: str = "mean",
    seed: int = 0,
    position_aware: bool = True,
) -> Ablator:
    """The :class:`Ablator` of ``kind`` whose values come from reference ``inputs``.

    ``inputs`` are the adapter's flat stimulus inputs (``EncodedProblems.flat_inputs()``), e.g.
    the training composite problems, shared by every subroutine of the base model.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"unknown ablation {kind!r}; choose one of {list(ABLATIONS)}")
    if kind == "zero":
        return Ablator("zero")
    if kind == "resample":
        if "tokens" not in inputs or "lengths" not in inputs:
            raise ValueError("resample ablation needs token inputs (tokens and lengths)")
        return Ablator(
            "resample",
            source_tokens=inputs["tokens"].to(adapter.device),
            source_lengths=inputs["lengths"].to(adapter.device),
            seed=seed,
        )
    from .unit_mask import UnitMask

    m = UnitMask.fixed(unit_map, torch.zeros(unit_map.n_units, dtype=torch.bool), "mean")
    m.set_mean(adapter, dict(inputs), position_aware=position_aware)
    return Ablator("mean", dict(m.ablation_values), dict(m.readout_values))


def apply_to_unit_mask(mask: Any, ablator: Ablator) -> Any:
    """Give a :class:`UnitMask` (mean or zero ablation) the ablator's values; returns it."""
    if ablator.kind == "resample":
        raise ValueError("a single UnitMask cannot replay resample ablation; use batched masks")
    if mask.ablation.value != ablator.kind:
        raise ValueError(f"the mask ablates with {mask.ablation.value}, the ablator {ablator.kind}")
    mask.ablation_values = {k: v.clone() for k, v in ablator.values.items()}
    mask.readout_values = {k: v.clone() for k, v in ablator.readout_values.items()}
    return mask


def stack_keep(masks: Sequence[Any]) -> Bool[Tensor, "k n"]:
    """``[K, n_units]`` booleans of K unit masks' binary masks."""
    return torch.stack([m.flat_binary().bool() for m in masks])


def supported_ablations(flat_inputs, kinds: tuple[str, ...] = ABLATIONS) -> tuple[str, ...]:
    """The ablations of ``kinds`` that inputs like ``flat_inputs`` support: resample needs
    token inputs (``tokens`` and ``lengths``), zero and mean work for any input (images)."""
    tokens = "tokens" in flat_inputs and "lengths" in flat_inputs
    return tuple(k for k in kinds if k != "resample" or tokens)
