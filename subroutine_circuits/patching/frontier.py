"""The faithfulness-size frontier: how faithful the best circuit of each size is, per ranking.

A *ranking* orders the units (most important first); its circuit of size ``k`` keeps the first
``k``. For every ranking (the learned mask's logits, activation patching, attribution patching,
random orders) the frontier measures the circuits at fixed sizes, fractions of all units (by
default MIB's sizes, 0.1% to 50%), with the complement ablated, and gives

- ``faithfulness``: MIB's normalised faithfulness ``f(C) = (m(C) - m(empty)) / (m(full) -
  m(empty))`` of the metric ``m`` on minimal pairs (Mueller et al. 2025, "MIB: A Mechanistic
  Interpretability Benchmark", circuit localization track);
- ``accuracy`` (optional): what a caller's callable says the circuit achieves, e.g. the
  subroutine's accuracy with everything outside the circuit ablated;
- ``CPR`` (circuit performance ratio, higher is better) and ``CMD`` (circuit minimality
  distance, lower is better): the areas under ``f`` and under ``|1 - f|`` over normalised
  circuit size in ``[0, 1]``, MIB's definitions, computed by the trapezoid rule over the
  measured sizes plus the two ends, where ``f(empty) = 0`` and ``f(full) = 1`` hold by the
  normalisation itself.

Random rankings are averaged: ``faithfulness`` and ``accuracy`` are the means over the random
orders at each size, and CPR / CMD are those of the mean curve (for CPR, an area, that is the
mean of the orders' CPRs). Single circuits (e.g. the chosen mask) are *points*: their own size and
faithfulness. Every circuit of every ranking goes through one batched
:func:`~subroutine_circuits.patching.circuits.circuit_metrics` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from subroutine_circuits.masks.units import UnitGroup
from subroutine_circuits.patching.circuits import (
    PatchBatch,
    _normalise,
    _ranked,
    circuit_metrics,
    curve_areas,
)
from subroutine_circuits.patching.scores import n_units

#: MIB's circuit sizes (fractions of the units; MIB counts edges, we count units).
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)

Accuracy = Callable[[Bool[Tensor, "c n_units"]], Sequence[float]]


@dataclass
class FrontierCurve:
    """One ranking's frontier: per size, the faithfulness (and accuracy) of its top-k circuit.

    ``sizes`` are unit counts ``round(fraction * n_units)``; ``n_orders`` is how many orders
    were averaged (random rankings), ``cpr`` / ``cmd`` MIB's areas over ``[0, 1]``.
    """

    method: str
    fractions: list[float]
    sizes: list[int]
    faithfulness: list[float]
    accuracy: list[float] | None
    cpr: float
    cmd: float
    n_orders: int = 1


@dataclass
class FrontierPoint:
    """A single circuit on the frontier's axes (e.g. the chosen mask)."""

    method: str
    size: int
    fraction: float
    faithfulness: float
    accuracy: float | None


@dataclass
class Frontier:
    """Every ranking's curve and every point, with the metric (and accuracy) of the full and
    the empty model."""

    curves: dict[str, FrontierCurve]
    points: dict[str, FrontierPoint]
    m_full: float
    m_empty: float
    n_units: int
    acc_full: float | None = None  # accuracy of the full model (None: no accuracy measured)
    acc_empty: float | None = None  # and of the model with every unit ablated


def score_order(scores: Float[Tensor, " n_units"], use_abs: bool = True) -> Int[Tensor, " n_units"]:
    """The ranking of per-unit scores: largest (``|score|`` if ``use_abs``) first, ties in
    unit order."""
    return _ranked(torch.as_tensor(scores).detach().float().cpu(), use_abs)


def mask_order(
    keep: Bool[Tensor, " n_units"],
    params: Float[Tensor, " n_units"],
    importance: Sequence[int] | None = None,
) -> Int[Tensor, " n_units"]:
    """The ranking of a learned mask: its kept units first, then the rest, each by the mask's
    parameter (logit) from largest, ties in unit order. Its top-``k`` circuit for ``k`` = the
    mask's size is the mask itself (a mask pruned after training keeps fewer units than its
    positive logits).

    ``importance`` (unit indices, most important first; e.g. the minimality pass's
    single-removal ranking reversed) orders the kept units instead of their logits, which
    annealing saturates, and then the dropped units it lists (units the pass removed); units
    it does not list follow their group by logit."""
    keep = torch.as_tensor(keep).bool().cpu()
    params = torch.as_tensor(params).detach().float().cpu()
    if keep.shape != params.shape or keep.ndim != 1:
        raise ValueError(f"keep {tuple(keep.shape)} and params {tuple(params.shape)} differ")
    if torch.isnan(params).any():
        raise ValueError("mask parameters contain NaN")
    # kept units get a key above every dropped one; sort is stable, so ties keep unit order
    finite = torch.where(torch.isinf(params), torch.sign(params) * 1e30, params).double()
    span = float(finite.max() - finite.min()) + 1.0 if finite.numel() else 1.0
    key = finite + keep.double() * 2 * span
    order = torch.sort(-key, stable=True).indices
    if importance is None:
        return order
    n = keep.numel()
    ranked = [int(u) for u in importance]
    if any(not 0 <= u < n for u in ranked) or len(set(ranked)) != len(ranked):
        raise ValueError(f"importance must list distinct unit indices in [0, {n})")
    listed = set(ranked)
    kept_flags = keep.tolist()
    by_logit = order.tolist()
    kept = [u for u in ranked if kept_flags[u]]
    kept += [u for u in by_logit if kept_flags[u] and u not in listed]
    dropped = [u for u in ranked if not kept_flags[u]]  # ranked but dropped (e.g. by the pass)
    dropped += [u for u in by_logit if not kept_flags[u] and u not in listed]
    return torch.tensor(kept + dropped, dtype=torch.long)


def random_orders(n: int, n_orders: int, seed: int) -> Int[Tensor, "r n"]:
    """``n_orders`` uniformly random rankings of ``n`` units from one seeded generator."""
    if n_orders < 1:
        raise ValueError(f"n_orders must be >= 1, got {n_orders}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=g) for _ in range(n_orders)])


def sizes_of(fractions: Sequence[float], n: int) -> list[int]:
    """Unit counts of size ``fractions`` (rounded) of ``n`` units."""
    fr = [float(f) for f in fractions]
    if not fr or any(not 0 < f < 1 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise ValueError(f"frontier fractions must be increasing and inside (0, 1), got {fr}")
    return [int(round(f * n)) for f in fr]


def _keeps(order: Int[Tensor, " n"], sizes: Sequence[int]) -> Bool[Tensor, "s n"]:
    keep = torch.zeros(len(sizes), order.numel(), dtype=torch.bool)
    for i, k in enumerate(sizes):
        keep[i, order[:k]] = True
    return keep


def frontier(
    model,
    batches: Sequence[PatchBatch] | PatchBatch,
    groups: Sequence[UnitGroup],
    orders: Mapping[str, Tensor],
    fractions: Sequence[float] = MIB_FRACTIONS,
    ablation: str = "resample",
    readout="logits",
    chunk_rows: int = 4096,
    accuracy: Accuracy | None = None,
    points: Mapping[str, Bool[Tensor, " n_units"]] | None = None,
    families: Mapping[str, Bool[Tensor, "s n_units"]] | None = None,
) -> Frontier:
    """Measure each ranking of ``orders`` (``[n_units]``, or ``[r, n_units]`` to average ``r``
    orders) at ``fractions`` of the units, each family of ``families`` (one circuit per
    fraction, row ``i`` keeping exactly ``sizes_of(fractions, n)[i]`` units: e.g. masks trained
    at each size, :func:`~subroutine_circuits.experiment.search.path_keeps`) as a curve, and
    each circuit of ``points``.

    ``batches`` are the minimal pairs the faithfulness is measured on (clean input, the
    complement ablated with ``ablation``: ``resample`` replays the corrupted input, MIB's
    convention); ``accuracy`` maps keep rows ``[c, n_units]`` to one number per row.
    """
    n = n_units(groups)
    sizes = sizes_of(fractions, n)
    blocks: list[tuple[str, int]] = []  # (name, number of orders)
    rows = []
    for name, order in orders.items():
        order = torch.as_tensor(order).long().cpu()
        order = order[None] if order.ndim == 1 else order
        if order.ndim != 2 or order.shape[1] != n:
            raise ValueError(f"order {name!r} has shape {tuple(order.shape)}, expected [r, {n}]")
        if not all(torch.equal(o.sort().values, torch.arange(n)) for o in order):
            raise ValueError(f"order {name!r} is not a permutation of the {n} units")
        blocks.append((name, order.shape[0]))
        rows += [_keeps(o, sizes) for o in order]
    for name, fam in (families or {}).items():
        if name in orders:
            raise ValueError(f"{name!r} names both a ranking and a family")
        fam = torch.as_tensor(fam).bool().cpu()
        if fam.shape != (len(sizes), n):
            raise ValueError(
                f"family {name!r} has shape {tuple(fam.shape)}, expected ({len(sizes)}, {n})"
            )
        got = fam.sum(1).tolist()
        if got != sizes:
            raise ValueError(f"family {name!r} keeps {got} units, the sizes are {sizes}")
        blocks.append((name, 1))
        rows.append(fam)
    point_items = list((points or {}).items())
    for name, keep in point_items:
        keep = torch.as_tensor(keep).bool().cpu()
        if keep.shape != (n,):
            raise ValueError(f"point {name!r} has shape {tuple(keep.shape)}, expected ({n},)")
        rows.append(keep[None])
    ends = torch.zeros(2, n, dtype=torch.bool)
    ends[0] = True
    keeps = torch.cat(rows + [ends])
    # each distinct circuit is measured once (small sizes repeat, e.g. k = 0)
    distinct, inverse = torch.unique(keeps, dim=0, return_inverse=True)
    m = circuit_metrics(model, batches, groups, distinct, ablation, readout, chunk_rows)[inverse]
    m_full, m_empty = float(m[-2]), float(m[-1])
    f = _normalise(m[:-2], m_full, m_empty).double()
    acc = acc_full = acc_empty = None
    if accuracy is not None:
        acc = torch.as_tensor(list(accuracy(distinct)), dtype=torch.float64)
        if acc.shape != (distinct.shape[0],):
            raise ValueError("accuracy must return one number per circuit")
        acc = acc[inverse]
        acc_full, acc_empty = float(acc[-2]), float(acc[-1])
    curves: dict[str, FrontierCurve] = {}
    start = 0
    s = len(sizes)
    for name, r in blocks:
        f_b = f[start : start + r * s].view(r, s).mean(0)
        a_b = None if acc is None else acc[start : start + r * s].view(r, s).mean(0).tolist()
        start += r * s
        x = [0.0, *[float(v) for v in fractions], 1.0]
        cpr, cmd = curve_areas(x, [0.0, *f_b.tolist(), 1.0])
        curves[name] = FrontierCurve(
            name, [float(v) for v in fractions], sizes, f_b.tolist(), a_b, cpr, cmd, r
        )
    pts: dict[str, FrontierPoint] = {}
    for i, (name, keep) in enumerate(point_items):
        k = int(torch.as_tensor(keep).sum())
        a = None if acc is None else float(acc[start + i])
        pts[name] = FrontierPoint(name, k, k / n, float(f[start + i]), a)
    return Frontier(curves, pts, m_full, m_empty, n, acc_full, acc_empty)


def frontier_rows(result: Frontier) -> list[dict]:
    """The rows of ``frontier.csv`` for one frontier: one per (ranking, size) and per point,
    with ``method, kind`` (``curve`` / ``point``), ``fraction, k, faithfulness, accuracy``,
    the ranking's ``cpr, cmd`` (NaN for points), and ``n_units, m_full, m_empty, acc_full,
    acc_empty`` (the full and the empty model)."""
    out = []
    for c in result.curves.values():
        for i, (fr, k) in enumerate(zip(c.fractions, c.sizes)):
            out.append(
                {
                    "method": c.method,
                    "kind": "curve",
                    "fraction": fr,
                    "k": k,
                    "faithfulness": c.faithfulness[i],
                    "accuracy": np.nan if c.accuracy is None else c.accuracy[i],
                    "cpr": c.cpr,
                    "cmd": c.cmd,
                    "n_orders": c.n_orders,
                }
            )
    for p in result.points.values():
        out.append(
            {
                "method": p.method,
                "kind": "point",
                "fraction": p.fraction,
                "k": p.size,
                "faithfulness": p.faithfulness,
                "accuracy": np.nan if p.accuracy is None else p.accuracy,
                "cpr": np.nan,
                "cmd": np.nan,
                "n_orders": 1,
            }
        )
    for r in out:
        r["n_units"] = result.n_units
        r["m_full"] = result.m_full
        r["m_empty"] = result.m_empty
        r["acc_full"] = np.nan if result.acc_full is None else result.acc_full
        r["acc_empty"] = np.nan if result.acc_empty is None else result.acc_empty
    return out
