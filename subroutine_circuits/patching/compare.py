"""Comparing a patching circuit with a mask subnetwork: overlap, rank agreement, ROC AUC."""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from subroutine_circuits.patching.circuits import top_k_circuit


def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy() if x.dtype != torch.bool else x.cpu().numpy()
    return np.asarray(x)


def jaccard(a: Bool[Tensor, "n"], b: Bool[Tensor, "n"]) -> float:
    """``|a & b| / |a | b|`` of two unit sets (1.0 when both are empty)."""
    a, b = _np(a).astype(bool), _np(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"unit sets differ in size: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` with ties given the average of the ranks they span."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=float)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def roc_auc(scores: Float[Tensor, "n"], labels: Bool[Tensor, "n"]) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (ties count 1/2).

    Computed as the Mann-Whitney statistic from average ranks. NaN when one class is empty.
    """
    s = _np(scores).astype(float)
    y = _np(labels).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def spearman(a: Float[Tensor, "n"], b: Float[Tensor, "n"]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if one is constant."""
    x, y = _np(a).astype(float), _np(b).astype(float)
    if x.shape != y.shape:
        raise ValueError(f"score vectors differ in size: {x.shape} vs {y.shape}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return math.nan if den == 0 else float((rx * ry).sum() / den)


def compare_with_mask(
    scores: Float[Tensor, "n_units"],
    mask_keep: Bool[Tensor, "n_units"],
    mask_params: Float[Tensor, "n_units"] | None = None,
    use_abs: bool = True,
) -> dict[str, float]:
    """Jaccard at matched size (top-``k``, ``k`` = the mask's kept count), Spearman of scores
    with the mask's per-unit parameters (if given), and ROC AUC of scores against the mask set.
    """
    scores = torch.as_tensor(scores).float().cpu()
    mask_keep = torch.as_tensor(mask_keep, dtype=torch.bool).cpu()
    if scores.shape != mask_keep.shape:
        raise ValueError(
            f"scores ({tuple(scores.shape)}) and mask ({tuple(mask_keep.shape)}) cover "
            "different numbers of units"
        )
    s = scores.abs() if use_abs else scores
    k = int(mask_keep.sum())
    out = {
        "k": k,
        "jaccard": jaccard(top_k_circuit(scores, k, use_abs), mask_keep),
        "roc_auc": roc_auc(s, mask_keep),
        "spearman": math.nan,
    }
    if mask_params is not None:
        out["spearman"] = spearman(s, torch.as_tensor(mask_params).float().cpu())
    return out
