"""Circuits from per-unit scores, and their faithfulness under ablation of the complement.

A circuit is a boolean vector over units (global order of a
:class:`~subroutine_circuits.masks.UnitMap`: group order, then index). Faithfulness of a circuit
``C`` is MIB's ``f(C) = (m(C) - m(empty)) / (m(full) - m(empty))``: the model runs on the clean
inputs with every unit outside ``C`` ablated (zero, mean, or resampled from the corrupted input).
Many circuits are evaluated in one forward pass (one batch copy per circuit). Ablation goes
through the masks' one implementation (:mod:`subroutine_circuits.masks.ablation`,
:class:`~subroutine_circuits.masks.UnitMask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from subroutine_circuits.adapters import as_adapter
from subroutine_circuits.adapters.base import Readout, named_hooks
from subroutine_circuits.masks.ablation import mix_copies, pooled_mean
from subroutine_circuits.masks.parametrization import Ablation
from subroutine_circuits.masks.unit_mask import UnitMask
from subroutine_circuits.masks.units import UnitGroup, UnitMap
from subroutine_circuits.memory import rows_per_pass, run_chunked
from subroutine_circuits.patching.scores import (
    Metric,
    check_pair_tokens,
    copy_keep,
    expand_batch,
    n_units,
)

ABLATIONS = ("zero", "mean", "resample")


def _ablation_name(ablation) -> str:
    """Accept a string or ``masks.Ablation`` and return its name (zero / mean / resample)."""
    name = Ablation.parse(ablation).value
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {ABLATIONS}")
    return name


@dataclass
class PatchBatch:
    """Equal-length clean/corrupted tokens and the per-example metric that goes with them."""

    clean_tokens: Int[Tensor, "batch pos"]
    corr_tokens: Int[Tensor, "batch pos"]
    metric: Metric

    def __post_init__(self) -> None:
        check_pair_tokens(self.clean_tokens, self.corr_tokens)

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.clean_tokens.shape[0])


# ----------------------------------------------------------------------------- selection


def _ranked(scores: Float[Tensor, "n_units"], use_abs: bool) -> Tensor:
    s = scores.abs() if use_abs else scores
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    # stable sort: ties keep unit order, so results are deterministic
    return torch.sort(-s, stable=True).indices


def top_k_circuit(
    scores: Float[Tensor, "n_units"], k: int, use_abs: bool = True
) -> Bool[Tensor, "n_units"]:
    """The ``k`` units with the largest scores (``|score|`` if ``use_abs``)."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}] (number of units)")
    keep = torch.zeros(n, dtype=torch.bool)
    keep[_ranked(scores, use_abs)[:k]] = True
    return keep


def threshold_circuit(
    scores: Float[Tensor, "n_units"], threshold: float, use_abs: bool = True
) -> Bool[Tensor, "n_units"]:
    """Units whose score (``|score|`` if ``use_abs``) is at least ``threshold``."""
    s = scores.abs() if use_abs else scores
    return (s >= threshold).cpu()


# ----------------------------------------------------------------------------- ablation values


def _keep_by_group(
    keep: Bool[Tensor, "c n_units"], groups: Sequence[UnitGroup]
) -> dict[str, Tensor]:
    out, start = {}, 0
    for g in groups:
        out[g.hook_name] = keep[:, start : start + g.size]
        start += g.size
    return out


@torch.no_grad()
def ablation_values(
    model,
    groups: Sequence[UnitGroup],
    batches: Sequence[PatchBatch],
    ablation: str = "mean",
) -> list[dict[str, Tensor]]:
    """Per batch, the value each hook's ablated units take.

    zero: ``0``; mean: the mean over every clean and corrupted example and position of all
    batches (:func:`~subroutine_circuits.masks.ablation.pooled_mean`, broadcastable, the same
    for every batch); resample: that batch's corrupted activation (``[batch, pos, ...]``).
    """
    ablation = _ablation_name(ablation)
    adapter = as_adapter(model)
    hooks = [g.hook_name for g in groups]
    if ablation == "zero":
        return [{h: torch.zeros(()) for h in hooks} for _ in batches]

    def noop(model, resid):
        return resid[:, -1]

    per_batch = []
    for b in batches:
        _, corr_acts, _ = adapter.layer_states(b.corr_tokens, hooks, noop)
        per_batch.append(corr_acts)
    if ablation == "resample":
        return per_batch
    refs: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for b, corr_acts in zip(batches, per_batch):
        _, clean_acts, _ = adapter.layer_states(b.clean_tokens, hooks, noop)
        for h in hooks:
            refs[h] += [clean_acts[h], corr_acts[h]]
    mean = {g.hook_name: pooled_mean(g, refs[g.hook_name]) for g in groups}
    return [mean for _ in batches]


def _broadcasts_over_batch(value: Tensor, axis: int = 2) -> bool:
    """True if ``value`` is the same for every example and position (zero / mean values):
    size 1 on every axis before the unit ``axis`` (batch, and position for axis 2)."""
    return value.ndim <= 2 or all(s == 1 for s in value.shape[: max(1, min(2, axis))])


@contextmanager
def ablate_units(
    model,
    groups: Sequence[UnitGroup] | UnitMap,
    ablated: Bool[Tensor, "n_units"],
    values: dict[str, Tensor] | None = None,
):
    """Context manager: the ``ablated`` units take ``values`` (default zero) inside the block.

    A fixed :class:`~subroutine_circuits.masks.UnitMask` keeping the other units, so this is the
    very ablation of the mask experiment. Values must broadcast over ``[batch, pos]`` (zero or
    mean values), so this works on inputs of any length.
    """
    unit_map = groups if isinstance(groups, UnitMap) else UnitMap(groups)
    ablated = torch.as_tensor(ablated, dtype=torch.bool)
    if ablated.shape != (unit_map.n_units,):
        raise ValueError(
            f"ablated has shape {tuple(ablated.shape)}, expected ({unit_map.n_units},) units"
        )
    kind = "zero" if values is None else "mean"
    mask = UnitMask.fixed(unit_map, ~ablated.cpu(), ablation=kind)
    if values is not None:
        vals = {}
        for g in unit_map.groups:
            v = torch.as_tensor(values.get(g.hook_name, torch.zeros(())))
            if not _broadcasts_over_batch(v, g.axis):
                raise ValueError(
                    f"ablation value for {g.hook_name} has shape {tuple(v.shape)}; it must "
                    "broadcast over batch and position (zero or mean ablation)"
                )
            vals[g.hook_name] = v
        mask.ablation_values = vals
    with mask.applied(as_adapter(model).model):
        yield model


# ----------------------------------------------------------------------------- faithfulness


@torch.no_grad()
def circuit_metrics(
    model,
    batches: Sequence[PatchBatch] | PatchBatch,
    groups: Sequence[UnitGroup],
    keeps: Bool[Tensor, "c n_units"],
    ablation: str = "mean",
    readout: str | Readout = "logits",
    chunk_rows: int = 4096,
    values: list[dict[str, Tensor]] | None = None,
) -> Float[Tensor, "c"]:
    """Mean metric on the clean inputs for each circuit (its complement ablated).

    Batches are weighted by their example counts. Circuits run as copies of each batch, at most
    ``chunk_rows`` rows per pass (fewer when the worker's GPU memory budget says so; halved
    while a pass runs out of GPU memory).
    """
    if isinstance(batches, PatchBatch):
        batches = [batches]
    if not batches:
        raise ValueError("no batches to evaluate")
    keeps = torch.as_tensor(keeps, dtype=torch.bool)
    if keeps.ndim != 2 or keeps.shape[1] != n_units(groups):
        raise ValueError(f"keeps must be [circuits, {n_units(groups)}], got {tuple(keeps.shape)}")
    adapter = as_adapter(model)
    readout = adapter.readout(readout)
    if values is None:
        values = ablation_values(adapter, groups, batches, ablation)
    total = torch.zeros(keeps.shape[0])
    n_total = 0
    for b, vals in zip(batches, values):
        batch = b.clean_tokens.shape[0]
        rows = rows_per_pass(adapter.model, b.clean_tokens.shape[1], chunk_rows)
        k_max = max(1, rows // batch)
        resid0 = adapter.input_state(b.clean_tokens)

        def run_circuits(
            part: range,
            b: PatchBatch = b,
            vals: dict[str, Tensor] = vals,
            batch: int = batch,
            resid0: Tensor = resid0,
        ) -> None:
            """Adds the metric of circuits ``part`` (one pass over copies of batch ``b``)."""
            kc = keeps[part.start : part.stop]
            k = kc.shape[0]
            per_group = _keep_by_group(kc, groups)
            keeps_k = {}
            for g in groups:
                keep_g = per_group[g.hook_name].to(resid0.device)  # [k, size]
                if not keep_g.all():
                    keeps_k[g.hook_name] = copy_keep(keep_g, g)

            def hook_fn(act, hook, k=k, keeps_k=keeps_k, vals=vals):
                return mix_copies(act, keeps_k[hook.name], vals[hook.name].to(act.device), k)

            with adapter.model.hooks(fwd_hooks=named_hooks(list(keeps_k), hook_fn)):
                out = adapter.run_from_layer(expand_batch(resid0, k), 0, readout)
            m = b.metric(out.reshape(k, batch, *out.shape[1:])).float().mean(-1).cpu()
            total[part.start : part.stop] += m * batch

        run_chunked(
            run_circuits, range(keeps.shape[0]), k_max, label="circuits", key="patching.circuits"
        )
        n_total += batch
    return total / n_total


@dataclass
class FaithfulnessCurve:
    """Faithfulness at circuit sizes; ``cpr`` = area under ``f`` over normalised size,
    ``cmd`` = area of ``|1 - f|`` (MIB's circuit performance ratio / minimality distance)."""

    sizes: list[int]
    fractions: list[float]
    faithfulness: list[float]
    m_full: float
    m_empty: float
    cpr: float
    cmd: float


DEFAULT_FRACTIONS = (
    0.0,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
)


def curve_areas(fractions: Sequence[float], f: Sequence[float]) -> tuple[float, float]:
    """``(CPR, CMD)``: trapezoid areas of ``f`` and ``|1 - f|`` over normalised size."""
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(f, dtype=float)
    if x.shape != y.shape or x.size < 2:
        raise ValueError("curve needs at least two (size, faithfulness) points of equal count")
    if np.any(np.diff(x) < 0):
        raise ValueError("curve sizes must be increasing")
    trap = getattr(np, "trapezoid", None) or np.trapz
    return float(trap(y, x)), float(trap(np.abs(1.0 - y), x))


def _normalise(m: Tensor, m_full: float, m_empty: float) -> Tensor:
    d = m_full - m_empty
    if d == 0:
        raise ValueError("full model and fully ablated model give the same metric")
    return (m - m_empty) / d


def faithfulness_curve(
    model,
    batches: Sequence[PatchBatch] | PatchBatch,
    groups: Sequence[UnitGroup],
    scores: Float[Tensor, "n_units"],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ablation: str = "mean",
    readout: str | Readout = "logits",
    use_abs: bool = True,
    chunk_rows: int = 4096,
) -> FaithfulnessCurve:
    """Faithfulness of the top-``k`` circuits for ``k = round(fraction * n_units)``."""
    n = n_units(groups)
    if scores.shape != (n,):
        raise ValueError(f"scores have shape {tuple(scores.shape)}, expected ({n},)")
    fractions = sorted(float(f) for f in fractions)
    if fractions[0] < 0 or fractions[-1] > 1:
        raise ValueError("fractions must lie in [0, 1]")
    sizes = [int(round(f * n)) for f in fractions]
    order = _ranked(scores, use_abs)
    keeps = torch.zeros(len(sizes) + 2, n, dtype=torch.bool)
    for i, k in enumerate(sizes):
        keeps[i, order[:k]] = True
    keeps[-2] = True  # full model; keeps[-1] stays empty
    m = circuit_metrics(model, batches, groups, keeps, ablation, readout, chunk_rows)
    m_full, m_empty = float(m[-2]), float(m[-1])
    f = _normalise(m[:-2], m_full, m_empty).tolist()
    cpr, cmd = curve_areas(fractions, f)
    return FaithfulnessCurve(sizes, fractions, f, m_full, m_empty, cpr, cmd)


def smallest_faithful_circuit(
    model,
    batches: Sequence[PatchBatch] | PatchBatch,
    groups: Sequence[UnitGroup],
    scores: Float[Tensor, "n_units"],
    target: float = 0.8,
    ablation: str = "mean",
    readout: str | Readout = "logits",
    use_abs: bool = True,
    chunk_rows: int = 4096,
    probes: int = 16,
) -> tuple[Bool[Tensor, "n_units"], float]:
    """The smallest top-``k`` circuit whose faithfulness reaches ``target``.

    Searches ``k`` by repeated batched bisection: ``probes`` sizes per round in the bracket
    where faithfulness first reaches the target (faithfulness need not be monotone; this
    returns the smallest probed size that reaches it). Returns ``(circuit, faithfulness)``.
    """
    if isinstance(batches, PatchBatch):
        batches = [batches]
    n = n_units(groups)
    if scores.shape != (n,):
        raise ValueError(f"scores have shape {tuple(scores.shape)}, expected ({n},)")
    if probes < 2:
        raise ValueError("probes must be >= 2")
    if not 0 < target <= 1:
        raise ValueError(f"target faithfulness must be in (0, 1], got {target}")
    order = _ranked(scores, use_abs)
    values = ablation_values(model, groups, batches, ablation)
    ends = torch.zeros(2, n, dtype=torch.bool)
    ends[0] = True
    m_full, m_empty = circuit_metrics(
        model, batches, groups, ends, ablation, readout, chunk_rows, values
    ).tolist()

    def faith(ks: list[int]) -> list[float]:
        keeps = torch.zeros(len(ks), n, dtype=torch.bool)
        for i, k in enumerate(ks):
            keeps[i, order[:k]] = True
        m = circuit_metrics(model, batches, groups, keeps, ablation, readout, chunk_rows, values)
        return _normalise(m, m_full, m_empty).tolist()

    lo, hi, f_hi = 0, n, 1.0  # f(n) = 1 by definition; invariant: f(hi) >= target
    while hi - lo > 1:
        ks = sorted({int(x) for x in np.linspace(lo, hi, probes + 2)[1:-1].round()} - {lo, hi})
        if not ks:
            break
        fs = faith(ks)
        hit = [i for i, f in enumerate(fs) if f >= target]
        if hit:
            i = hit[0]
            hi, f_hi = ks[i], fs[i]
            lo = ks[i - 1] if i > 0 else lo
        else:
            lo = ks[-1]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:hi]] = True
    return keep, float(f_hi)
