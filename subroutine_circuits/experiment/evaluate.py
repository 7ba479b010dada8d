"""The ablation matrix of subroutine masks, evaluated on TEST problems, with matched random
controls.

Conditions (all under the experiment's one ablation, :mod:`subroutine_circuits.masks.ablator`):
the subnetwork alone (everything outside it ablated), the subnetwork ablated, and ``n_random``
random subnetworks with the same number of kept units per (layer, unit kind) ablated
(``experiment.batched.matched_random_masks``). Columns: the target partition
(only this subroutine's predicate breaks the rule), the other partition, and the subroutine's
own problems. The subnetwork's removal is also reported under the other ablations
(``ablzero_*``, ablmean_*``, ``ablresample_*``; ``ablreinit_*`` for weight masks) as robustness
columns; they never enter the verdict. A robustness column is absent when its ablation is not
in ``ablators`` (resample needs token inputs: CNNs have no ``ablresample_*``).

``randabl_p`` (:func:`~subroutine_circuits.analysis.inference.randabl_p`) is the share of
random draws (the learned mask counted as one) whose ``abl_diff`` is at most the learned one's:
small when the learned subnetwork's removal is more specific to its subroutine than removing
any subnetwork of the same shape. Ties are decided exactly: the numbers of test problems of the
two partitions go to ``randabl_p``, which compares the clipped differences as integers on
their lattice (accuracies are correct-counts over those numbers), so equal counts are equal
whatever the float rounding. Draws are skipped (``randabl_p`` NaN) for runs that cannot be
compositional anyway (``usable`` false: search failed, base model excluded or bypassed; with a
``margin``, also runs that fail a margin, which ``run_verdict`` calls not compositional
without a random control).

``sub_diff_lo`` / ``sub_diff_hi`` and ``abl_diff_lo`` / ``abl_diff_hi`` are 95% percentile
bootstrap intervals of ``sub_diff`` and ``abl_diff`` over the test problems
(:func:`~subroutine_circuits.analysis.inference.problem_bootstrap`: each partition resampled
independently, from its exact number of correctly solved problems; :data:`BOOT_REPLICATES`
replicates with a seed derived from the run's subroutine and mask seed, so the same on every
machine). They measure the noise of the finite test set only, not that of the mask search;
:func:`~subroutine_circuits.analysis.inference.straddles_margin` reads them against a margin.

All conditions of all runs of a base model go through
:func:`~subroutine_circuits.experiment.batched.evaluate_fixed_masks` in batches (unit masks).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from subroutine_circuits.adapters.base import EncodedProblems
from subroutine_circuits.masks.ablator import Ablator
from subroutine_circuits.utils import clipped_diff

#: Bootstrap replicates of the per-run intervals (``sub_diff_lo`` ... ``abl_diff_hi``).
BOOT_REPLICATES = 2000
#: Coverage of those percentile intervals.
BOOT_LEVEL = 0.95


@dataclass
class RunToEvaluate:
    """One learned mask to evaluate: its subroutine, the other one, its seed and whether the
    run is usable (random controls drawn only then)."""

    subroutine: str
    other: str
    mask_seed: int
    mask: Any
    usable: bool = True
    draw_seed: int = 0
    #: the accuracy on the test ``sub_<p>`` problems a usable run's mask must reach (the
    #: held-out half of ``mask_ok``): below it the run is "search failed" and gets no draws
    min_sub_acc: float = 0.0


def _check_test(test: dict[str, EncodedProblems], runs: Sequence[RunToEvaluate]) -> None:
    for r in runs:
        for kind in (f"partition_{r.subroutine}", f"partition_{r.other}", f"sub_{r.subroutine}"):
            if kind not in test or len(test[kind]) == 0:
                raise ValueError(f"test split has no {kind!r} problems")


def _kind_counts(mask: Any) -> dict[str, Any]:
    """``density``, ``n_kept`` and per unit kind ``density_<kind>`` / ``n_kept_<kind>``."""
    out: dict[str, Any] = {
        "density": float(mask.density()),
        "n_kept": int(mask.flat_binary().sum()),
    }
    by_kind: dict[str, list[int]] = {}
    for s in mask.stats():
        acc = by_kind.setdefault(str(s["kind"]), [0, 0])
        acc[0] += int(s["kept"])
        acc[1] += int(s["n"])
    if hasattr(mask, "unit_map"):
        for kind, (kept, n) in sorted(by_kind.items()):
            out[f"n_kept_{kind}"] = kept
            out[f"density_{kind}"] = kept / n if n else 0.0
    return out


def _random_columns(
    learned_abl_diff: float,
    target: Float[np.ndarray, " n_draws"],
    other: Float[np.ndarray, " n_draws"],
    n_distinct: int,
    chance: float,
    n_problems: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """randabl_* columns from the random draws' accuracies (NaN when none were drawn).

    ``n_problems``: the numbers of (target, other) test problems the accuracies are
    correct-counts over; with it ``randabl_p`` decides ties exactly
    (:func:`~subroutine_circuits.analysis.inference.randabl_p`)."""
    from subroutine_circuits.analysis.inference import randabl_p

    if len(target) == 0:
        return _draw_columns(target, other, 0, math.nan, chance)
    diffs = clipped_diff(target, other, chance)
    p = randabl_p(learned_abl_diff, diffs, n_problems, chance)
    return _draw_columns(target, other, n_distinct, p, chance)


def _draw_columns(
    target: Float[np.ndarray, " n_draws"],
    other: Float[np.ndarray, " n_draws"],
    n_distinct: int,
    p: float,
    chance: float,
) -> dict[str, Any]:
    """randabl_* columns from the draws' accuracies and their p-value: ``randabl_target_acc``
    over every draw, ``randabl_other_acc`` / ``randabl_diff`` over the draws whose other
    partition was evaluated (NaN in ``other`` marks the others); NaN where there are none."""
    both = ~np.isnan(other)
    diff = math.nan
    if both.any():
        diff = float(np.mean(clipped_diff(target[both], other[both], chance)))
    return {
        "randabl_target_acc": float(target.mean()) if len(target) else math.nan,
        "randabl_other_acc": float(other[both].mean()) if both.any() else math.nan,
        "randabl_diff": diff,
        "randabl_diff_mean": diff,
        "randabl_p": float(p),
        "randabl_n_distinct": int(n_distinct),
    }


def _matrix_row(
    acc: dict[str, float],
    chance: float,
    chosen: str,
    run: RunToEvaluate,
    counts: Mapping[str, int],
    n_problems: tuple[int, int],
) -> dict[str, Any]:
    """sub_*/abl_* columns and their clipped differences from the condition accuracies, with
    the bootstrap intervals of ``sub_diff`` and ``abl_diff``: ``sub_diff_lo`` / ``sub_diff_hi``
    / ``abl_diff_lo`` / ``abl_diff_hi``, percentile bootstrap intervals over test problems
    (:func:`~subroutine_circuits.analysis.inference.problem_bootstrap` from the correct counts).

    ``counts``: the numbers of correctly solved test problems behind ``sub_target_acc``,
    ``sub_other_acc``, ``abl<chosen>_target_acc`` and ``abl<chosen>_other_acc`` (same keys);
    ``n_problems``: the numbers of (target, other) test problems. Each interval is widened, if
    need be, to contain the row's difference: that comes from the float accuracies, which a
    GPU's mean may round one ulp away from count / n (the bootstrap interval itself contains
    count / n's difference but for a chance below 1e-100)."""
    from subroutine_circuits.analysis.inference import problem_bootstrap

    row = dict(acc)
    row["sub_diff"] = clipped_diff(row["sub_target_acc"], row["sub_other_acc"], chance)
    for k in [
        k[: -len("_target_acc")] for k in acc if k.startswith("abl") and k.endswith("_target_acc")
    ]:
        row[f"{k}_diff"] = clipped_diff(row[f"{k}_target_acc"], row[f"{k}_other_acc"], chance)
    for col in ("target_acc", "other_acc", "diff"):
        row[f"abl_{col}"] = row[f"abl{chosen}_{col}"]
    row["ablation"] = chosen
    n_t, n_o = n_problems
    for col, cond in (("sub_diff", "sub"), ("abl_diff", f"abl{chosen}")):
        b = problem_bootstrap(
            counts[f"{cond}_target_acc"],
            counts[f"{cond}_other_acc"],
            chance,
            n_boot=BOOT_REPLICATES,
            seed=_boot_seed(run, col),
            level=BOOT_LEVEL,
            n_target=n_t,
            n_other=n_o,
        )
        row[f"{col}_lo"] = min(b["lo"], row[col])
        row[f"{col}_hi"] = max(b["hi"], row[col])
    return row


def _boot_seed(run: RunToEvaluate, column: str) -> int:
    """Seed of one bootstrap of a run: a CRC-32 of its subroutine, mask seed and the column
    (``zlib.crc32``, unlike ``hash``, is the same in every process and on every machine)."""
    return zlib.crc32(f"{run.subroutine}/{run.mask_seed}/{column}".encode())


def _correct_count(acc: float, n: int) -> int:
    """The number of correctly solved problems behind an accuracy over ``n`` problems.

    Exact for the adapters' accuracies: ``count / n`` in float64 is correctly rounded, so
    ``acc * n`` lies within a few ulps of the integer count."""
    k = round(acc * n)
    if abs(acc * n - k) > 1e-6:
        raise ValueError(f"accuracy {acc!r} is not a count over {n} problems")
    return int(k)


# ---------------------------------------------------------------------------- unit masks
def evaluate_unit_runs(
    adapter,
    runs: Sequence[RunToEvaluate],
    test: dict[str, EncodedProblems],
    ablators: dict[str, Ablator],
    chosen: str,
    n_random: int,
    chance: float = 0.25,
    margin: float | None = None,
    shortcuts: bool = True,
) -> list[dict[str, Any]]:
    """The ablation-matrix rows of unit-mask runs (one dict per run, in order).

    ``ablators`` maps ablation kinds to :class:`Ablator` objects (``chosen`` among them); the
    chosen one decides ``sub_*``, ``abl_*`` and the random controls, the others only give
    ``abl<kind>_*`` robustness columns. Random controls are drawn for usable runs; with
    ``margin`` given, only for usable runs that pass both margins (the only runs whose verdict
    the controls can change: ``randabl_*`` is NaN for the others). ``shortcuts``: the
    sequential null of :func:`_add_random_controls` (same verdicts, fewer evaluations).

    Runs over different unit maps (grid points that restrict ``layers``, chosen for one
    subroutine and not the other) are evaluated group by group, each group in batched passes.
    """
    _check_test(test, runs)
    maps: list[Any] = []
    for r in runs:
        if not any(r.mask.unit_map == m for m in maps):
            maps.append(r.mask.unit_map)
    if len(maps) > 1:
        rows: list[dict[str, Any]] = [{} for _ in runs]
        for m in maps:
            idx = [i for i, r in enumerate(runs) if r.mask.unit_map == m]
            part = evaluate_unit_runs(
                adapter,
                [runs[i] for i in idx],
                test,
                ablators,
                chosen,
                n_random,
                chance,
                margin,
                shortcuts,
            )
            for i, row in zip(idx, part):
                rows[i] = row
        return rows
    um = runs[0].mask.unit_map
    learned = [r.mask.flat_binary().bool() for r in runs]
    parts = sorted({f"partition_{x}" for r in runs for x in (r.subroutine, r.other)})
    keep = torch.stack([k for pair in zip(learned, [~k for k in learned]) for k in pair])
    acc: dict[str, list[float]] = {}
    cnt: dict[str, list[int]] = {}
    for p in parts:
        acc[p], cnt[p] = fixed_accuracies_counts(adapter, test[p], keep, um, ablators[chosen])
    rob_keep = torch.stack([~k for k in learned])
    rob = {
        kind: {p: fixed_accuracies(adapter, test[p], rob_keep, um, ab) for p in parts}
        for kind, ab in ablators.items()
        if kind != chosen
    }
    rows = []
    for i, r in enumerate(runs):
        t, o = f"partition_{r.subroutine}", f"partition_{r.other}"
        own = fixed_accuracies(
            adapter, test[f"sub_{r.subroutine}"], learned[i][None], um, ablators[chosen]
        )[0]
        a = {
            "sub_target_acc": acc[t][2 * i],
            "sub_other_acc": acc[o][2 * i],
            "sub_sub_acc": own,
            f"abl{chosen}_target_acc": acc[t][2 * i + 1],
            f"abl{chosen}_other_acc": acc[o][2 * i + 1],
        }
        for kind, by_part in rob.items():
            a[f"abl{kind}_target_acc"], a[f"abl{kind}_other_acc"] = by_part[t][i], by_part[o][i]
        counts = {
            "sub_target_acc": cnt[t][2 * i],
            "sub_other_acc": cnt[o][2 * i],
            f"abl{chosen}_target_acc": cnt[t][2 * i + 1],
            f"abl{chosen}_other_acc": cnt[o][2 * i + 1],
        }
        row = _matrix_row(a, chance, chosen, r, counts, _n_problems(test, r))
        row.update(_kind_counts(r.mask))
        rows.append(row)
    need = [_needs_controls(r, row, margin) for r, row in zip(runs, rows)]
    _add_random_controls(adapter, runs, rows, learned, need, test, ablators[chosen], n_random,
                         chance, shortcuts)  # fmt: skip
    return rows


def _needs_controls(run: RunToEvaluate, row: dict[str, Any], margin: float | None) -> bool:
    """Whether a run gets random draws: usable (its mask also reaching ``run.min_sub_acc`` on
    the test ``sub_<p>`` problems), and with ``margin`` given, passing both margins
    (:func:`~subroutine_circuits.analysis.inference.margins_ok`; the verdict of a run that
    fails one is "not compositional" whatever the draws)."""
    from subroutine_circuits.analysis.inference import margins_ok

    usable = run.usable and row["sub_sub_acc"] >= run.min_sub_acc
    return bool(usable and (margin is None or margins_ok(row["sub_diff"], row["abl_diff"], margin)))


def _n_problems(test: dict[str, EncodedProblems], run: RunToEvaluate) -> tuple[int, int]:
    """Numbers of test problems of a run's (target, other) partitions."""
    return len(test[f"partition_{run.subroutine}"]), len(test[f"partition_{run.other}"])


#: Draws per round of the sequential null (:func:`_add_random_controls`): after each round the
#: runs whose verdict the draws have decided stop drawing.
NULL_ROUND = 10


def stop_hits(n_random: int, alpha: float) -> int:
    """Draws at or below the learned ``abl_diff`` ("hits") after which ``randabl_p > alpha`` is
    certain with ``n_random`` draws: the smallest ``h`` with ``(1 + h) / (1 + n_random) >
    alpha`` (5 for 99 draws at 0.05). A run with fewer hits passes ``randabl_p <= alpha``."""
    if n_random < 1 or not 0 < alpha <= 1:
        raise ValueError(f"need n_random >= 1 and 0 < alpha <= 1, got {n_random}, {alpha}")
    h = max(0, math.floor(alpha * (n_random + 1) + 1e-9) - 1)  # the largest k that passes
    while (1 + h) / (1 + n_random) <= alpha:
        h += 1
    return h


def sequential_randabl_p(hits: int, n_drawn: int, n_random: int, stopped: bool) -> float:
    """``randabl_p`` of a null that drew ``n_drawn`` of ``n_random`` draws and found ``hits``.

    Not stopped (every draw made): ``(1 + hits) / (1 + n_random)``, as
    :func:`~subroutine_circuits.analysis.inference.randabl_p`. Stopped at the
    :func:`stop_hits`-th hit: ``max(hits / n_drawn, (1 + hits) / (1 + n_random))``, the larger
    of Besag & Clifford's (1991) sequential Monte Carlo p-value (valid: ``P(p <= a) <= a``) and
    the smallest p the remaining draws could have left; both exceed ``alpha``, so the verdict is
    the one all ``n_random`` draws give."""
    if not stopped:
        return (1 + hits) / (1 + n_drawn)
    return max(hits / n_drawn, (1 + hits) / (1 + n_random))


def _grouped_accuracies(adapter, test, um, ablator, wanted):
    """Accuracies of keep rows on test partitions, one batched call per partition:
    ``wanted`` maps a key to (partition name, ``[k, n_units]`` keep rows); returns key ->
    ``np.ndarray`` of k accuracies."""
    by_part: dict[str, list] = {}
    for key, (part, keep) in wanted.items():
        if len(keep):
            by_part.setdefault(part, []).append((key, keep))
    out = {key: np.zeros(0) for key in wanted}
    for part, items in by_part.items():
        acc = fixed_accuracies(adapter, test[part], torch.cat([k for _, k in items]), um, ablator)
        start = 0
        for key, keep in items:
            out[key] = np.asarray(acc[start : start + len(keep)], dtype=float)
            start += len(keep)
    return out


def _add_random_controls(
    adapter, runs, rows, learned, need, test, ablator, n_random, chance, shortcuts=True
):
    """Matched random draws of the runs in ``need``, evaluated in batched passes; fills the
    ``randabl_*`` and ``n_random`` columns of every row.

    With ``shortcuts`` (the default; ``random_shortcuts`` in the config) the draws come in
    rounds of :data:`NULL_ROUND` and two shortcuts skip work whose outcome is already certain,
    so the verdict is the one all ``n_random`` draws give:

    - a draw is evaluated on its target partition first; when even a perfect other partition
      could not bring its ``abl_diff`` down to the learned one (``max(t, chance) - 1 >
      learned`` on the exact lattice of counts), it is not a hit and its other partition is not
      evaluated (``randabl_n_screened`` counts them);
    - a run stops drawing at its :func:`stop_hits`-th hit (``randabl_stopped``;
      :func:`sequential_randabl_p`).

    ``randabl_target_acc`` is the mean over the draws made, ``randabl_other_acc`` and
    ``randabl_diff`` over the draws evaluated on both partitions (NaN when there are none)."""
    from subroutine_circuits.analysis.inference import RANDABL_ALPHA, at_or_below
    from subroutine_circuits.experiment.batched import matched_random_masks, n_distinct

    um = runs[0].mask.unit_map
    draws = {
        i: matched_random_masks(um, learned[i], n_random, runs[i].draw_seed)
        for i in range(len(runs))
        if need[i]
    }
    h = stop_hits(n_random, RANDABL_ALPHA)
    step = NULL_ROUND if shortcuts else n_random
    state = {i: {"t": [], "o": [], "hits": 0, "screened": 0, "n": 0, "stopped": False}
             for i in draws}  # fmt: skip
    for start in range(0, n_random, step):
        active = [i for i in draws if not state[i]["stopped"]]
        if not active:
            break
        part = {i: (f"partition_{runs[i].subroutine}", f"partition_{runs[i].other}")
                for i in active}  # fmt: skip
        keep = {i: ~draws[i][start : start + step] for i in active}
        tt = _grouped_accuracies(adapter, test, um, ablator,
                                 {i: (part[i][0], keep[i]) for i in active})  # fmt: skip
        # True: the draw could still be a hit (a perfect other partition would make it one),
        # so its other partition is needed
        reach = {
            i: at_or_below(rows[i]["abl_diff"], clipped_diff(tt[i], 1.0, chance),
                           _n_problems(test, runs[i]), chance)
            if shortcuts else np.ones(len(tt[i]), dtype=bool)
            for i in active
        }  # fmt: skip
        oo = _grouped_accuracies(adapter, test, um, ablator,
                                 {i: (part[i][1], keep[i][torch.from_numpy(reach[i])])
                                  for i in active})  # fmt: skip
        for i in active:
            st = state[i]
            o_full = np.full(len(tt[i]), np.nan)
            o_full[reach[i]] = oo[i]
            hit = np.zeros(len(tt[i]), dtype=bool)
            if reach[i].any():
                d = clipped_diff(tt[i][reach[i]], oo[i], chance)
                hit[reach[i]] = at_or_below(rows[i]["abl_diff"], d, _n_problems(test, runs[i]),
                                            chance)  # fmt: skip
            for j in range(len(tt[i])):  # draw by draw, so that a run stops at its h-th hit
                st["t"].append(tt[i][j])
                st["o"].append(o_full[j])
                st["screened"] += int(not reach[i][j])
                st["hits"] += int(hit[j])
                st["n"] += 1
                if shortcuts and st["hits"] >= h:
                    st["stopped"] = True
                    break
    for i, row in enumerate(rows):
        if i not in draws:
            row.update(_random_columns(row["abl_diff"], np.zeros(0), np.zeros(0), 0, chance))
            row.update(n_random=0, randabl_stopped=False, randabl_n_screened=0)
            continue
        st = state[i]
        p = sequential_randabl_p(st["hits"], st["n"], n_random, st["stopped"])
        nd = n_distinct(draws[i][: st["n"]])
        row.update(_draw_columns(np.asarray(st["t"]), np.asarray(st["o"]), nd, p, chance))
        row.update(
            n_random=st["n"],
            randabl_stopped=bool(st["stopped"]),
            randabl_n_screened=int(st["screened"]),
        )


def fixed_accuracies(
    adapter, data: EncodedProblems, keep, unit_map, ablator: Ablator, floor: float | None = None
) -> list[float]:
    """Accuracy of each fixed keep row on ``data`` under ``ablator`` (batched passes).

    With ``floor``, only whether a row reaches it matters for rows that do not: a row is
    dropped once its errors so far rule the floor out, and its entry is then the most it could
    still have reached (below ``floor``); rows reaching the floor get their exact accuracy
    (:func:`fixed_accuracies_losses`)."""
    if floor is not None:
        return fixed_accuracies_losses(adapter, data, keep, unit_map, ablator, floor)[0].tolist()
    return fixed_accuracies_counts(adapter, data, keep, unit_map, ablator)[0]


def fixed_accuracies_counts(
    adapter, data: EncodedProblems, keep, unit_map, ablator: Ablator
) -> tuple[list[float], list[int]]:
    """Accuracy (as :func:`fixed_accuracies`) and the exact number of correctly solved
    problems of each fixed keep row on ``data`` under ``ablator`` (batched passes)."""
    scores, odd = _fixed_scores(adapter, data, keep, unit_map, ablator)
    correct = scores.argmax(-1) == odd
    return correct.double().mean(1).tolist(), [int(c) for c in correct.sum(1).tolist()]


def fixed_accuracies_losses(
    adapter, data: EncodedProblems, keep, unit_map, ablator: Ablator, floor: float | None = None
) -> tuple[Float[Tensor, " k"], Float[Tensor, " k"]]:
    """Accuracy and mean OOO cross-entropy (the mask training loss) of each fixed keep row on
    ``data`` under ``ablator`` (batched passes); both ``[K]`` on the CPU.

    With ``floor`` (the minimality pass asks only which rows keep the accuracy at or above it,
    and the loss of those): the problems are scored one chunk of passes at a time (the chunks
    :func:`~subroutine_circuits.experiment.batched.fixed_mask_scores` uses, so every score is
    the one a whole call gives) and a row leaves once ``(correct + problems left) / n`` falls
    below ``floor``; such a row gets that bound as its accuracy (below ``floor``) and an
    infinite loss. Rows that reach the floor get exact values. Resample ablation draws its
    sources pass by pass, so it is scored whole (no rows leave)."""
    import torch.nn.functional as F

    if floor is None or ablator.kind == "resample":
        scores, odd = _fixed_scores(adapter, data, keep, unit_map, ablator)
        left = None
    else:
        scores, odd, left = _fixed_scores_to_floor(adapter, data, keep, unit_map, ablator, floor)
    acc = (scores.argmax(-1) == odd).double().mean(1)
    loss = F.cross_entropy(scores.flatten(0, 1), odd.flatten(), reduction="none")
    loss = loss.view(scores.shape[:2]).double().mean(1)
    if left is not None:
        gone = ~torch.isnan(left)
        acc = torch.where(gone, left, acc)
        loss = torch.where(gone, torch.full_like(loss, math.inf), loss)
    return acc, loss


def _fixed_scores_to_floor(
    adapter, data: EncodedProblems, keep, unit_map, ablator: Ablator, floor: float
) -> tuple[Float[Tensor, "k n n_stimuli"], Tensor, Float[Tensor, " k"]]:
    """:func:`_fixed_scores` chunk by chunk of problems, rows leaving once they cannot reach
    ``floor``; also the accuracy bound at which each row left (NaN: stayed to the end).
    The scores of rows that left are zero from their leaving on."""
    from subroutine_circuits.experiment.batched import fixed_problem_chunk

    keep = torch.as_tensor(keep)
    n, k = len(data), keep.shape[0]
    chunk = fixed_problem_chunk(adapter.model, data, adapter)
    odd_all = data.odd.cpu()
    scores = torch.zeros(k, n, data.n_stimuli)
    correct = torch.zeros(k, dtype=torch.long)
    left = torch.full((k,), math.nan, dtype=torch.float64)
    rows = torch.arange(k)
    for p0 in range(0, n, chunk):
        p1 = min(n, p0 + chunk)
        part = data.batch(torch.arange(p0, p1, device=data.odd.device))
        got, _ = _fixed_scores(adapter, part, keep[rows.to(keep.device)], unit_map, ablator)
        scores[rows, p0:p1] = got
        correct[rows] += (got.argmax(-1) == odd_all[None, p0:p1]).sum(1)
        bound = (correct[rows] + (n - p1)).double() / n
        out = bound < floor
        left[rows[out]] = bound[out]
        rows = rows[~out]
        if len(rows) == 0:
            break
    return scores, odd_all[None, :].expand(k, -1), left


def _fixed_scores(
    adapter, data: EncodedProblems, keep, unit_map, ablator: Ablator
) -> tuple[Float[Tensor, "k n n_stimuli"], Tensor]:
    """OOO scores ``[K, n, n_stimuli]`` (float32) of each fixed keep row on ``data`` under
    ``ablator``, and the odd-one-out labels expanded to ``[K, n]``."""
    from subroutine_circuits.experiment.batched import fixed_mask_scores

    scores = fixed_mask_scores(
        adapter.model,
        data,
        keep,
        getattr(adapter, "pool", None),
        unit_map=unit_map,
        ablator=ablator.to(adapter.device),
        adapter=adapter,  # scores inputs without tokens (images)
    ).float()
    odd = data.odd.cpu()[None, :].expand(scores.shape[0], -1)
    return scores, odd


# ---------------------------------------------------------------------------- weight masks
def evaluate_weight_runs(
    adapter,
    runs: Sequence[RunToEvaluate],
    test: dict[str, EncodedProblems],
    n_random: int,
    chance: float = 0.25,
    margin: float | None = None,
) -> list[dict[str, Any]]:
    """The ablation-matrix rows of weight-mask runs (masked weights zeroed; ``ablreinit_*``:
    re-initialised instead). Random controls keep as many weights per parameter tensor."""
    _check_test(test, runs)
    rows = []
    for r in runs:
        t, o = f"partition_{r.subroutine}", f"partition_{r.other}"
        keep = r.mask.flat_binary().bool()
        sub, abl = r.mask.fixed_like(keep), r.mask.fixed_like(~keep)
        reinit = r.mask.fixed_like(~keep, ablation="reinit", seed=r.mask_seed)
        a = {
            "sub_target_acc": adapter.accuracy(test[t], sub),
            "sub_other_acc": adapter.accuracy(test[o], sub),
            "sub_sub_acc": adapter.accuracy(test[f"sub_{r.subroutine}"], sub),
            "ablzero_target_acc": adapter.accuracy(test[t], abl),
            "ablzero_other_acc": adapter.accuracy(test[o], abl),
            "ablreinit_target_acc": adapter.accuracy(test[t], reinit),
            "ablreinit_other_acc": adapter.accuracy(test[o], reinit),
        }
        n_t, n_o = _n_problems(test, r)
        counts = {
            "sub_target_acc": _correct_count(a["sub_target_acc"], n_t),
            "sub_other_acc": _correct_count(a["sub_other_acc"], n_o),
            "ablzero_target_acc": _correct_count(a["ablzero_target_acc"], n_t),
            "ablzero_other_acc": _correct_count(a["ablzero_other_acc"], n_o),
        }
        row = _matrix_row(a, chance, "zero", r, counts, (n_t, n_o))
        rand = []
        if _needs_controls(r, row, margin):
            for j in range(n_random):
                d = r.mask.random_like(seed=r.draw_seed + j, per_param=True).flat_binary()
                rand.append((d, r.mask.fixed_like(~d.bool())))
        tt = np.asarray([adapter.accuracy(test[t], m) for _, m in rand])
        oo = np.asarray([adapter.accuracy(test[o], m) for _, m in rand])
        distinct = len({tuple(d.tolist()) for d, _ in rand})
        row.update(_random_columns(row["abl_diff"], tt, oo, distinct, chance, _n_problems(test, r)))
        row["n_random"] = len(rand)
        row.update(randabl_stopped=False, randabl_n_screened=0)  # every draw made, in full
        row.update(_kind_counts(r.mask))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- one mask
def ablation_matrix(
    adapter,
    mask,
    test: dict[str, EncodedProblems],
    subroutine: str,
    other: str,
    seed: int = 0,
    reference: EncodedProblems | None = None,
    chance: float = 0.25,
    margin: float = 0.05,
    ablation: str = "mean",
    n_random: int = 99,
) -> dict[str, Any]:
    """The ablation matrix, random controls and verdict of ONE mask (outside a study).

    ``reference`` supplies the stimuli of the mean / resample ablation (a balanced set such as
    the training composite problems; required unless ``ablation == "zero"``). Unit masks get
    ``abl<kind>_*`` columns for all three ablations; weight masks zero their weights. The
    ``verdict`` / ``compositional`` / ``margins_ok`` / ``paper_compositional`` columns
    (:func:`~subroutine_circuits.analysis.inference.verdict_columns`) assume a usable base model
    and a successful search (check ``mask_val_acc`` yourself).
    """
    from subroutine_circuits.analysis.inference import verdict_columns
    from subroutine_circuits.masks.ablator import reference_ablator, supported_ablations

    run = RunToEvaluate(subroutine, other, seed, mask, True, draw_seed=seed)
    if hasattr(mask, "unit_map"):
        if reference is None and ablation != "zero":
            raise ValueError(f"{ablation} ablation needs reference problems")
        flat = reference.flat_inputs() if reference is not None else {}
        kinds = supported_ablations(flat) if reference is not None else ("zero",)
        if ablation not in kinds:
            raise ValueError(
                f"{ablation} ablation needs token inputs; these inputs support {list(kinds)}"
            )
        abls = {k: reference_ablator(adapter, mask.unit_map, flat, k, seed) for k in kinds}
        row = evaluate_unit_runs(adapter, [run], test, abls, ablation, n_random, chance)[0]
    else:
        row = evaluate_weight_runs(adapter, [run], test, n_random, chance)[0]
    row.update(verdict_columns(row, margin=margin))
    return row
