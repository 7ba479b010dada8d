"""Score unit rankings and kept sets against a planted truth; rows of ``groundtruth.csv``.

Conventions: a higher unit score means "more part of the subnetwork". For a mask the score is
its continuous parameter (hard concrete: ``log_alpha``; continuous sparsification: the logit
``s``; a fixed mask: 1 kept / 0 dropped); for patching scores the caller decides the sign (an
effect can be negative: ``use_abs=True`` ranks by magnitude).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

#: Columns of ``groundtruth.csv`` in order (``verdict`` is filled by the experiment).
ROW_FIELDS = (
    "model_kind",
    "seed",
    "subroutine",
    "method",
    "roc_auc",
    "precision",
    "recall",
    "n_units",
    "n_truth",
    "n_kept",
    "copies_touched",
    "verdict",
)


def _as_vectors(scores: Any, truth: Any) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
    scores = torch.as_tensor(scores).detach().reshape(-1).double().cpu()
    truth = torch.as_tensor(truth).detach().reshape(-1).cpu()
    if truth.dtype != torch.bool:
        if not bool(((truth == 0) | (truth == 1)).all()):
            raise ValueError("truth must be boolean (or 0/1)")
        truth = truth.bool()
    if scores.numel() != truth.numel():
        raise ValueError(
            f"scores has {scores.numel()} units but truth has {truth.numel()}: align both to "
            "the same unit order (PlantedModel.truth_vector(subroutine, unit_map))"
        )
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("unit scores contain NaN or inf")
    return scores, truth


def score_units(unit_scores: Any, truth_bool: Any) -> float:
    """ROC AUC of ``unit_scores`` against the planted units ``truth_bool``.

    The probability that a planted unit scores higher than a non-planted one, ties counting a
    half (the Mann-Whitney U statistic over ``n_pos * n_neg``, with average ranks for ties).
    NaN when every unit or no unit is planted.
    """
    scores, truth = _as_vectors(unit_scores, truth_bool)
    n_pos = int(truth.sum())
    n_neg = truth.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks (1-based) with ties sharing their mean rank
    sorted_scores, order = torch.sort(scores)
    ranks = torch.empty_like(scores)
    n = scores.numel()
    i = 0
    values = sorted_scores.tolist()
    while i < n:
        j = i
        while j + 1 < n and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = float(ranks[truth].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def precision_recall(kept: Any, truth_bool: Any) -> tuple[float, float]:
    """``(precision, recall)`` of a kept set against the planted units.

    precision = |kept & truth| / |kept| (NaN if nothing is kept), recall = |kept & truth| /
    |truth| (NaN if nothing is planted).
    """
    kept_t = torch.as_tensor(kept).detach().reshape(-1).cpu()
    kept_t, truth = _as_vectors(kept_t.double(), truth_bool)
    if not bool(((kept_t == 0) | (kept_t == 1)).all()):
        raise ValueError("kept must be boolean (or 0/1)")
    kept_b = kept_t.bool()
    hit = int((kept_b & truth).sum())
    n_kept, n_truth = int(kept_b.sum()), int(truth.sum())
    precision = hit / n_kept if n_kept else float("nan")
    recall = hit / n_truth if n_truth else float("nan")
    return precision, recall


def mask_unit_scores(mask: Any) -> Float[Tensor, " n_units"]:
    """A unit mask's continuous scores in its flat (unit map) order (see the module docstring)."""
    parts = getattr(mask, "parts", None)
    if parts is None:
        raise ValueError(f"{type(mask).__name__} has no mask parts; pass a masks.UnitMask")
    out = []
    for p in parts:
        if hasattr(p, "log_alpha"):
            v = p.log_alpha
        elif hasattr(p, "logits"):
            v = p.logits
        else:
            v = p.binary().float()
        out.append(v.detach().reshape(-1).float().cpu())
    return torch.cat(out)


def top_k_kept(scores: Any, k: int) -> Bool[Tensor, " n"]:
    """The ``k`` highest-scoring units (ties broken by unit order), e.g. at the planted size."""
    scores = torch.as_tensor(scores).detach().reshape(-1).double().cpu()
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k must be in [0, {scores.numel()}], got {k}")
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.sort(-scores, stable=True).indices[:k]] = True
    return keep


def groundtruth_row(
    planted: Any,
    subroutine: str,
    method: str,
    scores: Any,
    kept: Any = None,
    units: Any = None,
    use_abs: bool = False,
    verdict: Any = None,
) -> dict[str, Any]:
    """One row of ``groundtruth.csv`` for a method's unit scores on a planted model.

    ``planted``: a ``PlantedModel``; ``scores``: one score per unit of ``units`` (a
    ``masks.UnitMap`` or a list of ``(layer, kind, index)``; default every head and neuron in
    ``tl_unit_map`` order); ``kept``: the method's kept set over the same units (``None``:
    precision and recall are NaN). ``copies_touched``: how many of the planted parts that
    compute ``subroutine`` hold a kept unit (a redundant model has two copies: 1 means the kept
    set lies in one copy, 2 that it spans both). For planted kinds without a unit-level truth
    (random-init) ``roc_auc``, ``precision`` and ``recall`` are NaN; the row still
    carries the verdict.
    """
    scores_t = torch.as_tensor(scores).detach().reshape(-1).double().cpu()
    if use_abs:
        scores_t = scores_t.abs()
    unit_list = units if units is not None else planted.units()
    if hasattr(unit_list, "units"):
        unit_list = unit_list.units()
    if scores_t.numel() != len(unit_list):
        raise ValueError(
            f"{method}: {scores_t.numel()} scores for {len(unit_list)} units (pass the unit map "
            "the scores were computed over)"
        )
    row: dict[str, Any] = {
        "model_kind": planted.kind,
        "seed": planted.seed,
        "subroutine": subroutine,
        "method": method,
        "roc_auc": float("nan"),
        "precision": float("nan"),
        "recall": float("nan"),
        "n_units": len(unit_list),
        "n_truth": float("nan"),
        "n_kept": float("nan") if kept is None else int(torch.as_tensor(kept).sum()),
        "copies_touched": float("nan"),
        "verdict": verdict,
    }
    if planted.truth is None:
        if subroutine not in planted.subroutines:
            raise ValueError(
                f"unknown subroutine {subroutine!r}; the task has {list(planted.subroutines)}"
            )
        return row
    truth = planted.truth_vector(subroutine, unit_list)
    row["n_truth"] = int(truth.sum())
    row["roc_auc"] = score_units(scores_t, truth)
    if kept is not None:
        row["precision"], row["recall"] = precision_recall(kept, truth)
        from subroutine_circuits.groundtruth.planted import truth_vector

        kept_b = torch.as_tensor(kept).bool().reshape(-1)
        copies = [p["units"] for p in planted.parts.values() if subroutine in p["computes"]]
        row["copies_touched"] = sum(
            bool((kept_b & truth_vector(c, unit_list)).any()) for c in copies
        )
    return row


def mask_row(planted: Any, subroutine: str, mask: Any, verdict: Any = None) -> dict[str, Any]:
    """:func:`groundtruth_row` for a trained ``UnitMask`` (method ``"mask"``): its continuous
    scores rank the units, its binary mask is the kept set, its unit map aligns the truth."""
    unit_map = getattr(mask, "unit_map", None)
    if unit_map is None:
        raise ValueError("mask_row needs a masks.UnitMask (a weight mask has no units)")
    return groundtruth_row(
        planted,
        subroutine,
        "mask",
        mask_unit_scores(mask),
        kept=mask.flat_binary(),
        units=unit_map,
        verdict=verdict,
    )


def _verdict_of(v: Any) -> str | None:
    """``"compositional"`` / ``"not compositional"`` for a usable run's verdict (a string of
    ``analysis.inference.run_verdict`` or a bool), ``None`` for anything else ("search failed",
    "excluded", missing)."""
    if isinstance(v, str):
        return v if v in ("compositional", "not compositional") else None
    if isinstance(v, bool) or (hasattr(v, "dtype") and str(v.dtype) == "bool"):
        return "compositional" if bool(v) else "not compositional"
    return None


def error_rates(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Verdict error rates over the usable runs among ``rows`` (others are ignored).

    A row needs ``model_kind`` and ``verdict`` (see :func:`_verdict_of`). The expected verdict
    of each kind is ``planted.EXPECTED`` (a row's own ``expected`` wins when present).

    - ``missed_compositional``: share of *modular* runs not called compositional;
    - ``false_compositional``: share of runs of kinds expected "not compositional" (redundant,
      entangled, random-init) called compositional;
    - ``per_kind``: for every kind, ``n`` usable runs, ``n_compositional`` and ``error`` (the
      share whose verdict differs from the expected one);
    - ``all_runs``: for every kind, ``runs`` (every row, a failed search too) and
      ``called_compositional``, how many of *all* runs were called compositional (a count that
      means something when no run is usable, as for random-init models, whose searches fail).
    """
    from subroutine_circuits.groundtruth.planted import EXPECTED

    all_runs: dict[str, dict[str, int]] = {}
    for r in rows:
        d = all_runs.setdefault(r["model_kind"], {"runs": 0, "called_compositional": 0})
        d["runs"] += 1
        d["called_compositional"] += _verdict_of(r.get("verdict")) == "compositional"
    per_kind: dict[str, dict[str, Any]] = {}
    for r in rows:
        v = _verdict_of(r.get("verdict"))
        if v is None:
            continue
        kind = r["model_kind"]
        expected = r.get("expected") or EXPECTED.get(kind)
        d = per_kind.setdefault(kind, {"expected": expected, "n": 0, "n_compositional": 0})
        d["n"] += 1
        d["n_compositional"] += v == "compositional"
    for d in per_kind.values():
        wrong = (
            d["n"] - d["n_compositional"]
            if d["expected"] == "compositional"
            else d["n_compositional"]
        )
        d["error"] = wrong / d["n"]
    mod = per_kind.get("modular", {"n": 0, "n_compositional": 0})
    non = [d for d in per_kind.values() if d["expected"] == "not compositional"]
    n_non = sum(d["n"] for d in non)
    return {
        "missed_compositional": (1 - mod["n_compositional"] / mod["n"]) if mod["n"] else math.nan,
        "false_compositional": (sum(d["n_compositional"] for d in non) / n_non)
        if n_non
        else math.nan,
        "n_modular": mod["n"],
        "n_non_compositional": n_non,
        "per_kind": per_kind,
        "all_runs": all_runs,
    }


def all_runs_text(rates: dict[str, Any]) -> str:
    """``rates["all_runs"]`` as one line for people: ``"modular 11 of 12; random_init 0 of 12"``
    (runs called compositional of all runs, per kind; used by the CLI and the report)."""
    return "; ".join(
        f"{k} {v['called_compositional']} of {v['runs']}"
        for k, v in rates.get("all_runs", {}).items()
    )
