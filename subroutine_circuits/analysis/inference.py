"""Inference for the compositionality verdict: runs, base models, tests, and agreement nulls.

Pure functions on pandas / numpy / scipy (statsmodels only for the GEE model, imported lazily).
The input of the table functions is a results table with one row per run, i.e. per
(task, model, init, base_seed, mask_seed, subroutine), holding at least ``task``, ``model``,
``init``, ``subroutine``, ``base_seed``, ``sub_diff``, ``abl_diff`` and ``randabl_p``. The columns
``base_ok`` (default True), ``bypass`` (default False) and ``mask_ok`` (default True) are read
when present (an empty / NaN cell takes the default too). A table without ``randabl_p`` (results
written before the matched random control existed) is accepted: its runs that pass both margins
get the verdict ``"no random control"`` and count as neither compositional nor not compositional
(a run that fails a margin is "not compositional" with or without the control).

Why base models are the unit of analysis: the mask seeds of one base model search the *same*
weights, so their verdicts are correlated; counting them as independent draws (as a Fisher test
over runs does) inflates the sample size by the number of mask seeds. Every interval and test here
therefore works on one number per base model (its share of compositional usable runs, or its mean
``sub_diff`` / ``abl_diff``), or on run-level outcomes with errors clustered by base model (GEE).

Layout:

1. :func:`randabl_p`, :func:`margins_ok`, :func:`is_residual_path`, :func:`run_verdict`,
   :func:`verdict_columns`, :func:`run_verdicts` - the run-level verdict (ours, and the paper's
   criterion beside it).
2. :func:`base_model_table`, :func:`summarize_cells` - one row per base model / per cell, with
   :func:`clopper_pearson` and :func:`t_interval` intervals.
3. :func:`permutation_test`, :func:`gee_logistic`, :func:`holm`, :func:`cell_tests`,
   :func:`sign_flip_test`, :func:`paired_tests`, :func:`summary_table` - base-model level tests
   of one init against its control (unpaired two-sided; paired one-sided over shared base
   seeds, usable-runs and intention-to-treat analyses).
4. :func:`expected_jaccard`, :func:`spearman_permutation`, :func:`auc_mannwhitney`,
   :func:`agreement_table` - mask-vs-patching agreement per unit kind and layer, with nulls.
5. :func:`problem_bootstrap` - a per-run bootstrap over test problems of a clipped difference;
   :func:`straddles_margin` - whether a run's intervals contain its margins.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Int

from subroutine_circuits.utils import CHANCE

#: Keys of one cell of the summary.
CELL_KEYS: tuple[str, ...] = ("task", "model", "init", "subroutine")
#: Keys of one base model within a cell.
BASE_KEYS: tuple[str, ...] = (*CELL_KEYS, "base_seed")
#: Columns every results table must hold.
REQUIRED_COLUMNS: tuple[str, ...] = (*BASE_KEYS, "sub_diff", "abl_diff")
#: Optional boolean columns and the value assumed when a table lacks them.
OPTIONAL_BOOL_DEFAULTS: dict[str, bool] = {
    "base_ok": True,
    "bypass": False,
    "mask_ok": True,
    "residual_path": False,
}
DEFAULT_MARGIN = 0.05
#: Level ``randabl_p`` must not exceed for a run to be compositional (``randabl_p <= alpha``).
RANDABL_ALPHA = 0.05
#: Without the numbers of test problems, :func:`randabl_p` counts values this close as ties
#: (float rounding of differences of accuracies is ~1e-16; distinct differences of accuracies
#: over fewer than ~10^5 problems per partition lie more than 1e-12 apart).
TIE_TOLERANCE = 1e-12
#: Largest lattice denominator :func:`clipped_diff_units` accepts (float rounding of a difference
#: times this stays far below half a lattice step).
_MAX_LATTICE = 2**40
#: (init, control init) pairs tested by default: trained vs random init, pretrained vs trained.
DEFAULT_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("trained", "random_init"),
    ("pretrained", "trained"),
)
#: (init, control init) pairs of the paired one-sided tests (init > control), every analysis.
PAIRED_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("pretrained", "trained"),
    ("trained", "random_init"),
    ("pretrained", "random_init"),
)
#: The per-run bootstrap interval columns (results.csv) :func:`straddles_margin` reads.
_CI_COLUMNS: tuple[str, ...] = ("sub_diff_lo", "sub_diff_hi", "abl_diff_lo", "abl_diff_hi")
#: The analyses of the paired tests: usable runs (primary) and intention-to-treat.
ANALYSES: tuple[str, ...] = ("usable", "itt")
COMPOSITIONAL = "compositional"
NOT_COMPOSITIONAL = "not compositional"
SEARCH_FAILED = "search failed"
EXCLUDED = "excluded"
NO_CONTROL = "no random control"
RESIDUAL_PATH = "residual path"
VERDICTS: tuple[str, ...] = (
    COMPOSITIONAL, NOT_COMPOSITIONAL, SEARCH_FAILED, EXCLUDED, NO_CONTROL, RESIDUAL_PATH
)  # fmt: skip


# ============================================================================ helpers


_TRUE = {"true", "1", "1.0", "yes"}
_FALSE = {"false", "0", "0.0", "no"}


def _to_bool(value: Any, name: str) -> bool:
    """A bool from a bool / 0-1 number / 'True'-'False' string; ``ValueError`` naming ``name``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"{name!r} must be a boolean, got {value!r}")


def _bool_column(series: pd.Series, name: str, default: bool | None = None) -> pd.Series:
    """A column coerced to bool element-wise (raises naming the column on a bad value).

    With ``default``, empty / NaN cells take that value (a flag not measured for that row)."""
    if series.dtype == bool:
        return series
    if default is not None:
        series = series.where(series.notna(), default)
    return series.map(lambda v: _to_bool(v, name)).astype(bool)


def _get(row: Mapping[str, Any] | pd.Series, key: str, default: Any = None) -> Any:
    """``row[key]`` for dicts and Series alike, ``default`` when absent."""
    try:
        return row[key]
    except (KeyError, IndexError):
        return default


def _flag(row: Mapping[str, Any] | pd.Series, key: str, default: bool) -> Any:
    """An optional flag of a row: ``default`` when absent, None or NaN."""
    v = _get(row, key, default)
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return default
    return v


def _finite_float(value: Any, name: str) -> float:
    """A float that must not be NaN (raises naming ``name``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name!r} must be a number, got {value!r}") from None
    if math.isnan(v):
        raise ValueError(f"{name!r} is NaN")
    return v


# ============================================================================ 1. run verdicts


def clipped_diff_units(
    diffs: Sequence[float] | Float[np.ndarray, "n"],
    n_problems: tuple[int, int],
    chance: float = CHANCE,
) -> tuple[Int[np.ndarray, "n"], int]:
    """Clipped differences of accuracies as exact integers: ``(k, L)`` with ``diff = k / L``.

    A clipped difference ``max(acc_t, chance) - max(acc_o, chance)`` of accuracies measured on
    ``n_problems = (n_target, n_other)`` problems (``acc = correct / n``) is one of
    ``i/n_target - j/n_other``, ``i/n_target - chance``, ``chance - j/n_other`` or 0, so it is an
    integer multiple of ``1/L`` with ``L = lcm(n_target, n_other, q)`` for ``chance = p/q``
    (``chance`` read as the closest fraction with a denominator up to 10^9: 1/4, 1/3, ...). Two
    differences with equal correct-counts therefore get the same ``k`` even when float rounding
    made them differ by 1e-16, and different exact values always get different ``k``: comparing
    the ``k`` decides ties exactly.

    Raises ``ValueError`` on NaN, on ``n`` < 1, on a lattice too fine to resolve in float
    (``L > 2**40``), and on a value more than 1% of a lattice step away from the lattice (it is
    not a clipped difference of accuracies over these numbers of problems).
    """
    n_t, n_o = (int(n) for n in n_problems)
    if n_t < 1 or n_o < 1:
        raise ValueError(f"n_problems must be positive, got {tuple(n_problems)}")
    c = Fraction(float(chance)).limit_denominator(10**9)
    lattice = math.lcm(n_t, n_o, c.denominator)
    if lattice > _MAX_LATTICE:
        raise ValueError(f"lattice 1/{lattice} too fine to decide ties in float arithmetic")
    d = np.asarray(diffs, dtype=float).reshape(-1)
    if np.isnan(d).any():
        raise ValueError("clipped differences contain NaN")
    scaled = d * lattice
    k = np.rint(scaled)
    off = np.abs(scaled - k)
    if (off > 0.01).any():
        bad = float(d[np.argmax(off)])
        raise ValueError(
            f"{bad!r} is not a clipped difference of accuracies over {n_t} and {n_o} problems "
            f"(chance {chance})"
        )
    return k.astype(np.int64), lattice


def randabl_p(
    learned_abl_diff: float,
    random_abl_diffs: Sequence[float] | Float[np.ndarray, "n_draws"],
    n_problems: tuple[int, int] | None = None,
    chance: float = CHANCE,
) -> float:
    """Monte Carlo p-value of a learned mask's ``abl_diff`` against matched random subnetworks.

    Null hypothesis: the learned subnetwork is no more specific than a random subnetwork with the
    same number of units per (layer, unit kind), i.e. its ``abl_diff`` is exchangeable with those
    of the random draws. Small ``abl_diff`` (ablation hurts the target partition more than the
    other) is the direction of interest, so the p-value is the share of draws whose ``abl_diff``
    is at most the learned one, with the learned mask counted as one of the draws::

        p = (1 + #{random_abl_diff <= learned}) / (1 + n_draws)

    Why the +1: under the null the learned value is one of ``n + 1`` exchangeable values, so its
    rank is uniform and ``P(p <= alpha) <= alpha`` holds exactly for every ``n`` (Phipson & Smyth
    2010, "Permutation p-values should never be zero"). The uncorrected share ``#/n`` can be 0 and
    rejects too often. A consequence: with ``n`` draws the smallest attainable p is ``1/(n+1)``,
    so at least 19 draws are needed for ``p <= 0.05`` to be possible (1/20 = 0.05); with 99
    draws a run passes ``alpha = 0.05`` with up to four draws at most the learned value
    (5/100) and fails with five.

    Ties count against the learned mask (``<=``), the conservative choice, and are decided
    exactly when ``n_problems = (n_target, n_other)``, the numbers of test problems of the
    target and other partitions the accuracies were measured on, is given: the differences are
    compared as integers on their lattice (:func:`clipped_diff_units`), so a draw with the same
    correct-counts as the learned mask is a tie even when float rounding of different
    (target, other) pairs put it 1e-16 above. Without ``n_problems`` values within
    :data:`TIE_TOLERANCE` of the learned one count as ties. ``chance`` is the clip of the
    differences (only read with ``n_problems``). Raises ``ValueError`` on no draws, NaN values,
    or (with ``n_problems``) values that are not clipped differences over those problems.
    """
    r = np.asarray(random_abl_diffs, dtype=float).reshape(-1)
    if r.size == 0:
        raise ValueError("randabl_p needs at least one random draw")
    at_most = np.count_nonzero(at_or_below(learned_abl_diff, r, n_problems, chance))
    return float((1 + at_most) / (1 + r.size))


def at_or_below(
    learned_abl_diff: float,
    random_abl_diffs: Sequence[float] | Float[np.ndarray, "n_draws"],
    n_problems: tuple[int, int] | None = None,
    chance: float = CHANCE,
) -> Bool[np.ndarray, "n_draws"]:
    """Which draws' ``abl_diff`` is at most the learned one (the "hits" of :func:`randabl_p`),
    with ties decided exactly on the lattice of counts when ``n_problems`` is given
    (:func:`clipped_diff_units`), else within :data:`TIE_TOLERANCE`. Raises ``ValueError`` on
    NaN."""
    learned = _finite_float(learned_abl_diff, "learned_abl_diff")
    r = np.asarray(random_abl_diffs, dtype=float).reshape(-1)
    if np.isnan(r).any():
        raise ValueError("random_abl_diffs contain NaN")
    if n_problems is None:
        return r <= learned + TIE_TOLERANCE
    k, _ = clipped_diff_units(np.concatenate([[learned], r]), n_problems, chance)
    return k[1:] <= k[0]


def margins_ok(sub_diff: Any, abl_diff: Any, margin: float = DEFAULT_MARGIN) -> bool:
    """The margins criterion: ``sub_diff > margin`` and ``abl_diff < -margin``.

    The subnetwork alone solves the target partition better than the other one, and removing it
    hurts the target partition more than the other one, each by more than ``margin`` (strict
    inequalities; the paper's whole criterion). False when either value is absent or NaN (a run
    without the measurement does not pass).
    """
    try:
        s, a = float(sub_diff), float(abl_diff)
    except (TypeError, ValueError):
        return False
    return bool(s > margin and a < -margin)


def _usable_flags(row: Mapping[str, Any] | pd.Series) -> tuple[bool, bool]:
    """(base model usable: ``base_ok`` and not ``bypass``, ``mask_ok``) with their defaults."""
    flags = {k: _to_bool(_flag(row, k, d), k) for k, d in OPTIONAL_BOOL_DEFAULTS.items()}
    return flags["base_ok"] and not flags["bypass"], flags["mask_ok"]


def is_residual_path(n_kept: Any, min_units: int = 1) -> bool:
    """Whether a mask keeping ``n_kept`` units is a *residual path* mask: fewer than
    ``min_units`` units (default 1: an empty mask). A successful search that ends there solves
    its subroutine around the maskable units (e.g. embedding to unembedding), so its ablation
    says nothing about subnetworks. False when ``n_kept`` is absent or NaN."""
    if min_units < 1:
        raise ValueError(f"min_units must be >= 1, got {min_units}")
    try:
        n = float(n_kept)
    except (TypeError, ValueError):
        return False
    return bool(not math.isnan(n) and n < min_units)


def run_verdict(
    row: Mapping[str, Any] | pd.Series,
    margin: float = DEFAULT_MARGIN,
    alpha: float = RANDABL_ALPHA,
) -> str:
    """The verdict of one run (one results row).

    In order of precedence:

    1. ``"excluded"``: the base model is not usable (``base_ok`` false, or ``bypass`` true:
       information reaches the readout around the maskable units);
    2. ``"search failed"``: the mask did not reach the success threshold (``mask_ok`` false:
       on validation or on the test ``sub_<p>`` problems); such a run says nothing about
       compositionality either way;
    2b. ``"residual path"``: the search succeeded with a mask of fewer than ``min_mask_units``
       units (``residual_path`` true, :func:`is_residual_path`): the subroutine is solved
       around the maskable units, and ablating the empty subnetwork says nothing;
    3. ``"not compositional"``: the margins fail (not ``sub_diff > margin`` and
       ``abl_diff < -margin``, :func:`margins_ok`), whatever ``randabl_p`` says or whether it
       exists: no random control can make such a run compositional, so it is decided, and
       counts in every denominator;
    4. ``"no random control"``: the margins pass but ``randabl_p`` is absent or NaN (no matched
       random control was run, e.g. results written by an older version): the run cannot be
       judged either way;
    5. ``"compositional"``: the margins pass and ``randabl_p <= alpha`` (the learned
       subnetwork's ablation is more specific than a matched random one's; ``<=`` because the
       +1 p-value is itself conservative and takes the values ``k / (n + 1)``: 5 / 100 = 0.05
       passes ``alpha = 0.05``);
    6. ``"not compositional"`` otherwise (``randabl_p > alpha``).

    Absent ``base_ok`` / ``bypass`` / ``mask_ok`` / ``residual_path`` fields take the values of
    :data:`OPTIONAL_BOOL_DEFAULTS`. ``sub_diff`` and ``abl_diff`` of a usable run, and
    ``randabl_p`` when present, must be numbers (NaN ``sub_diff`` / ``abl_diff`` raise
    ``ValueError``: a missing measurement is not a negative result).
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    base_usable, mask_ok = _usable_flags(row)
    if not base_usable:
        return EXCLUDED
    if not mask_ok:
        return SEARCH_FAILED
    if _to_bool(_flag(row, "residual_path", False), "residual_path"):
        return RESIDUAL_PATH
    values = {}
    for k in ("sub_diff", "abl_diff"):
        v = _get(row, k)
        if v is None:
            raise ValueError(f"run row lacks {k!r}")
        values[k] = _finite_float(v, k)
    if not margins_ok(values["sub_diff"], values["abl_diff"], margin):
        return NOT_COMPOSITIONAL
    p = _get(row, "randabl_p")
    if p is None or (isinstance(p, (float, np.floating)) and math.isnan(p)):
        return NO_CONTROL
    if _finite_float(p, "randabl_p") <= alpha:
        return COMPOSITIONAL
    return NOT_COMPOSITIONAL


def verdict_columns(
    row: Mapping[str, Any] | pd.Series,
    margin: float = DEFAULT_MARGIN,
    alpha: float = RANDABL_ALPHA,
) -> dict[str, Any]:
    """The verdict columns of one results row: ours and the paper's criterion side by side.

    - ``verdict``: :func:`run_verdict`; ``compositional``: ``verdict == "compositional"``;
    - ``margins_ok``: :func:`margins_ok` of the row's ``sub_diff`` / ``abl_diff`` (the margins
      alone, whatever the flags; False when a value is absent or NaN);
    - ``paper_compositional``: the paper's criterion, base model usable (``base_ok``, no
      ``bypass``), mask search succeeded (``mask_ok``) and ``margins_ok``, with no random
      control (the null of ``randabl_p`` is this library's addition).

    The one place ``results.csv`` rows get these columns (``experiment.verdicts.run_row``);
    :func:`run_verdicts` computes the same for a table.
    """
    verdict = run_verdict(row, margin, alpha)
    base_usable, mask_ok = _usable_flags(row)
    margins = margins_ok(_get(row, "sub_diff"), _get(row, "abl_diff"), margin)
    return {
        "verdict": verdict,
        "compositional": verdict == COMPOSITIONAL,
        "margins_ok": margins,
        "paper_compositional": bool(base_usable and mask_ok and margins),
    }


def validate_runs(results: pd.DataFrame) -> pd.DataFrame:
    """Check a results table and return a copy with the optional bool columns filled and typed.

    Raises ``ValueError`` on a non-DataFrame, an empty table or missing required columns.
    """
    if not isinstance(results, pd.DataFrame):
        raise ValueError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    if results.empty:
        raise ValueError("results table has no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}")
    out = results.copy()
    for c, default in OPTIONAL_BOOL_DEFAULTS.items():
        out[c] = _bool_column(out[c], c, default) if c in out.columns else default
    if "randabl_p" not in out.columns:
        out["randabl_p"] = np.nan
    for c in ("task", "model", "init", "subroutine"):
        out[c] = out[c].astype(str)
    return out


def run_verdicts(
    results: pd.DataFrame, margin: float = DEFAULT_MARGIN, alpha: float = RANDABL_ALPHA
) -> pd.DataFrame:
    """A copy of ``results`` with the :func:`verdict_columns` (``verdict``, ``compositional``,
    ``margins_ok``, ``paper_compositional``, recomputed from the row's inputs) and ``usable``
    / ``paper_usable`` columns.

    ``usable`` = the run counts for our verdict (verdict compositional or not compositional);
    ``paper_usable`` = it counts for the paper's criterion (base model usable and mask search
    succeeded: our usable runs plus those without a random control and the residual-path
    masks, which the paper's criterion has no rule for).
    """
    df = validate_runs(results)
    cols = pd.DataFrame(
        [verdict_columns(r, margin, alpha) for r in df.to_dict("records")], index=df.index
    )
    for c in cols.columns:
        df[c] = cols[c] if c == "verdict" else cols[c].astype(bool)
    df["usable"] = df["verdict"].isin([COMPOSITIONAL, NOT_COMPOSITIONAL])
    df["paper_usable"] = df["verdict"].isin(
        [COMPOSITIONAL, NOT_COMPOSITIONAL, NO_CONTROL, RESIDUAL_PATH]
    )
    return df


# ============================================================================ 2. base models, cells


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a binomial proportion ``k / n``.

    Bounds are Beta quantiles: ``lo = Beta(alpha/2; k, n-k+1)`` (0 when ``k = 0``) and
    ``hi = Beta(1-alpha/2; k+1, n-k)`` (1 when ``k = n``). Coverage is at least ``level`` for every
    ``n``, which is what a handful of base models needs. ``(nan, nan)`` when ``n = 0``.
    """
    from scipy.stats import beta

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def t_interval(
    values: Sequence[float] | Float[np.ndarray, "n"], level: float = 0.95
) -> tuple[float, float, float]:
    """Mean and Student-t interval ``mean +- t(1-alpha/2, n-1) * sd / sqrt(n)``.

    Meant for one number per base model (base models are independent draws; mask seeds are not).
    NaNs are dropped. Returns ``(mean, lo, hi)``; ``lo``/``hi`` are NaN with fewer than two values
    (one base model says nothing about the spread between base models); all NaN with none.
    """
    from scipy.stats import t as t_dist

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (float("nan"),) * 3
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(t_dist.ppf(0.5 + level / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half


def _flag_count(g: pd.DataFrame, column: str) -> float:
    """How many rows of ``g`` have the boolean ``column`` true (NaN when results lack it)."""
    if column not in g.columns:
        return np.nan
    return float(_bool_column(g[column], column).sum())


def base_model_table(
    results: pd.DataFrame, margin: float = DEFAULT_MARGIN, alpha: float = RANDABL_ALPHA
) -> pd.DataFrame:
    """One row per (task, model, init, subroutine, base_seed): the base model as the unit.

    Columns: the keys, ``n_runs``, ``n_excluded`` (runs of an excluded / bypassing base model),
    ``n_failed`` (mask search failed), ``n_no_control`` (margins pass, no matched random control),
    ``base_ok`` / ``bypass`` (the base model's flags), ``n_usable``, ``n_compositional``,
    ``frac_compositional`` (``n_compositional / n_usable``, NaN without usable runs),
    ``mostly_compositional`` (more than half of the usable runs compositional; False without
    usable runs, see ``has_usable``),
    ``has_usable`` and ``sub_diff_mean`` / ``abl_diff_mean`` over usable runs; and the same
    for the paper's criterion (:func:`verdict_columns`: margins only, no random control):
    ``n_paper_usable`` (runs of a usable base model whose search succeeded),
    ``n_paper_compositional``, ``paper_frac_compositional``, ``paper_mostly_compositional``,
    ``has_paper_usable``.

    Every count follows from :func:`run_verdict`: a run that fails a margin is usable and not
    compositional, a run without a random control is left out only when it passes the margins.
    Also ``n_residual`` (residual-path runs), ``n_budget_limited`` (runs whose mask search
    ran out of budget while still improving, ``mask_budget_limited``; NaN without that column),
    ``n_straddle`` (usable runs whose bootstrap
    interval straddles a margin, :func:`straddles_margin`; NaN without interval columns), and
    the intention-to-treat reading (every run counts, only ``compositional`` is compositional):
    ``itt_frac_compositional`` = ``n_compositional / n_runs`` and
    ``itt_mostly_compositional``.
    """
    df = run_verdicts(results, margin, alpha)
    rows = []
    for key, g in df.groupby(list(BASE_KEYS), sort=True):
        u = g[g["usable"]]
        n_usable = len(u)
        n_comp = int((u["verdict"] == COMPOSITIONAL).sum())
        frac = n_comp / n_usable if n_usable else float("nan")
        pu = g[g["paper_usable"]]
        n_pu = len(pu)
        n_pc = int(pu["paper_compositional"].sum())
        n_straddle = sum(straddles_margin(r, margin) for r in u.to_dict("records"))
        has_ci = n_usable > 0 and all(c in u.columns for c in _CI_COLUMNS)
        row = dict(zip(BASE_KEYS, key))
        row.update(
            n_runs=len(g),
            n_excluded=int((g["verdict"] == EXCLUDED).sum()),
            n_failed=int((g["verdict"] == SEARCH_FAILED).sum()),
            n_no_control=int((g["verdict"] == NO_CONTROL).sum()),
            n_residual=int((g["verdict"] == RESIDUAL_PATH).sum()),
            n_budget_limited=_flag_count(g, "mask_budget_limited"),
            n_straddle=int(n_straddle) if has_ci else np.nan,
            itt_frac_compositional=n_comp / len(g),
            itt_mostly_compositional=bool(2 * n_comp > len(g)),
            base_ok=bool(g["base_ok"].all()),
            bypass=bool(g["bypass"].any()),
            n_usable=n_usable,
            n_compositional=n_comp,
            frac_compositional=frac,
            mostly_compositional=bool(n_usable > 0 and 2 * n_comp > n_usable),
            has_usable=n_usable > 0,
            sub_diff_mean=float(pd.to_numeric(u["sub_diff"]).mean()) if n_usable else np.nan,
            abl_diff_mean=float(pd.to_numeric(u["abl_diff"]).mean()) if n_usable else np.nan,
            n_paper_usable=n_pu,
            n_paper_compositional=n_pc,
            paper_frac_compositional=n_pc / n_pu if n_pu else float("nan"),
            paper_mostly_compositional=bool(n_pu > 0 and 2 * n_pc > n_pu),
            has_paper_usable=n_pu > 0,
        )
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_cells(
    results: pd.DataFrame,
    margin: float = DEFAULT_MARGIN,
    alpha: float = RANDABL_ALPHA,
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per (task, model, init, subroutine) with base-model level statistics.

    Columns: the keys; ``n_base_models`` (base models with at least one usable run) and
    ``n_base_models_unusable`` (the others); ``base_models_compositional`` (of the usable base
    models, those whose usable runs are mostly compositional), ``base_models_compositional_frac``
    and its exact Clopper-Pearson interval ``..._lo`` / ``..._hi``; ``sub_diff_mean/_lo/_hi`` and
    ``abl_diff_mean/_lo/_hi``: mean over base-model means with a t interval (df = n_base - 1,
    NaN bounds with one base model); run counts ``runs_total``, ``runs_usable``, ``runs_failed``,
    ``runs_excluded``, ``runs_no_control``, ``runs_compositional``; base-model flags
    ``base_models_excluded`` (``base_ok`` false: failed the composite task on validation) and
    ``base_models_bypass`` (passed it but flagged ``bypass``); the paper's criterion beside
    ours (margins only, no random control; :func:`verdict_columns`): ``paper_n_base_models``
    (base models with a run whose search succeeded), ``paper_base_models_compositional`` (of
    those, the ones whose such runs are mostly paper-compositional), ``paper_runs_usable`` and
    ``paper_runs_compositional``; ``runs_residual`` (residual-path runs),
    ``runs_budget_limited`` (searches cut off by their budget while still improving, excluded
    runs included; NaN for results without ``mask_budget_limited``), ``runs_straddle`` /
    ``runs_straddle_frac`` (usable runs whose bootstrap interval straddles a margin, and their
    share; NaN without interval columns); the intention-to-treat reading (every run and base
    model counts): ``itt_n_base_models``, ``itt_base_models_compositional`` with its share and
    Clopper-Pearson interval, ``itt_runs_compositional`` (over ``runs_total``).
    """
    bm = base_model_table(results, margin, alpha)
    rows = []
    for key, g in bm.groupby(list(CELL_KEYS), sort=True):
        ok = g[g["has_usable"]]
        n_base = len(ok)
        k = int(ok["mostly_compositional"].sum())
        lo, hi = clopper_pearson(k, n_base, level)
        k_itt = int(g["itt_mostly_compositional"].sum())
        itt_lo, itt_hi = clopper_pearson(k_itt, len(g), level)
        n_usable_runs = int(g["n_usable"].sum())
        straddle = float(g["n_straddle"].sum(min_count=1))  # NaN: no intervals
        row = dict(zip(CELL_KEYS, key))
        row.update(
            n_base_models=n_base,
            n_base_models_unusable=int((~g["has_usable"]).sum()),
            base_models_compositional=k,
            base_models_compositional_frac=k / n_base if n_base else float("nan"),
            base_models_compositional_lo=lo,
            base_models_compositional_hi=hi,
        )
        for col in ("sub_diff", "abl_diff"):
            m, mlo, mhi = t_interval(ok[f"{col}_mean"].to_numpy(dtype=float), level)
            row.update({f"{col}_mean": m, f"{col}_lo": mlo, f"{col}_hi": mhi})
        row.update(
            runs_total=int(g["n_runs"].sum()),
            runs_usable=int(g["n_usable"].sum()),
            runs_failed=int(g["n_failed"].sum()),
            runs_excluded=int(g["n_excluded"].sum()),
            runs_no_control=int(g["n_no_control"].sum()),
            runs_residual=int(g["n_residual"].sum()),
            runs_budget_limited=float(g["n_budget_limited"].sum(min_count=1)),
            runs_straddle=straddle,
            runs_straddle_frac=straddle / n_usable_runs if n_usable_runs else np.nan,
            base_models_excluded=int((~g["base_ok"]).sum()),
            base_models_bypass=int((g["base_ok"] & g["bypass"]).sum()),
            runs_compositional=int(g["n_compositional"].sum()),
            paper_n_base_models=int(g["has_paper_usable"].sum()),
            paper_base_models_compositional=int(g["paper_mostly_compositional"].sum()),
            paper_runs_usable=int(g["n_paper_usable"].sum()),
            paper_runs_compositional=int(g["n_paper_compositional"].sum()),
            itt_n_base_models=len(g),
            itt_base_models_compositional=k_itt,
            itt_base_models_compositional_frac=k_itt / len(g),
            itt_base_models_compositional_lo=itt_lo,
            itt_base_models_compositional_hi=itt_hi,
            itt_runs_compositional=int(g["n_compositional"].sum()),
        )
        rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================ 3. tests


def permutation_test(
    a: Sequence[float] | Float[np.ndarray, "n_a"],
    b: Sequence[float] | Float[np.ndarray, "n_b"],
    alternative: str = "two-sided",
    max_exact: int = 100_000,
    n_perm: int = 20_000,
    seed: int = 0,
) -> tuple[float, float, str, int]:
    """Two-sample permutation test of ``mean(a) - mean(b)`` (one value per independent unit).

    Under the null the group labels are exchangeable, so every split of the pooled values into
    groups of sizes ``len(a)`` and ``len(b)`` is equally likely. When there are at most
    ``max_exact`` such splits all are enumerated and the p-value is exact: the share of splits
    whose statistic is at least as extreme as the observed one (the observed split included).
    Otherwise ``n_perm`` seeded random relabelings give the Monte Carlo p-value
    ``(1 + #extreme) / (1 + n_perm)``. ``alternative``: ``"two-sided"`` (|diff| >= |observed|),
    ``"greater"`` (diff >= observed) or ``"less"`` (diff <= observed).

    Returns ``(diff, p_value, method, n_relabelings)`` with ``method`` ``"exact"`` or
    ``"monte carlo"``. Raises ``ValueError`` when a group is empty or holds NaN.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    x = np.asarray(a, dtype=float).reshape(-1)
    y = np.asarray(b, dtype=float).reshape(-1)
    if x.size == 0 or y.size == 0:
        raise ValueError(f"both groups need values, got sizes {x.size} and {y.size}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("permutation_test values contain NaN")
    pooled = np.concatenate([x, y])
    n, na = pooled.size, x.size
    total = pooled.sum()
    observed = x.mean() - y.mean()

    def _diffs(sum_a: np.ndarray) -> np.ndarray:
        return sum_a / na - (total - sum_a) / (n - na)

    n_splits = math.comb(n, na)
    if n_splits <= max_exact:
        idx = np.fromiter(
            itertools.chain.from_iterable(itertools.combinations(range(n), na)),
            dtype=np.int64,
            count=n_splits * na,
        ).reshape(n_splits, na)
        d = _diffs(pooled[idx].sum(axis=1))
        method, n_rel = "exact", n_splits
    else:
        if n_perm < 1:
            raise ValueError(f"n_perm must be >= 1, got {n_perm}")
        rng = np.random.default_rng(seed)
        perms = rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)[:, :na]
        d = _diffs(pooled[perms].sum(axis=1))
        method, n_rel = "monte carlo", n_perm
    tol = 1e-12 * max(1.0, abs(observed))
    if alternative == "two-sided":
        extreme = np.abs(d) >= abs(observed) - tol
    elif alternative == "greater":
        extreme = d >= observed - tol
    else:
        extreme = d <= observed + tol
    count = int(extreme.sum())
    p = count / n_rel if method == "exact" else (1 + count) / (1 + n_rel)
    return float(observed), float(min(1.0, p)), method, n_rel


def gee_logistic(
    y: Sequence[float] | Float[np.ndarray, "n_runs"],
    x: Sequence[float] | Float[np.ndarray, "n_runs"],
    groups: Sequence[Any],
    min_clusters: int = 10,
) -> dict[str, Any]:
    """GEE logistic regression of a binary run outcome on a binary group indicator.

    Model ``logit P(y = 1) = b0 + b1 * x`` with an exchangeable working correlation within
    clusters (``groups``: one id per base model) and the robust (sandwich) covariance, fitted with
    statsmodels. Returns ``{"log_odds": b1, "se": robust se, "p_value": Wald p, "note": ""}``; the
    numbers are NaN and ``note`` says why when the model is not estimable:

    - fewer than ``min_clusters`` clusters, or fewer than two in a group: the sandwich estimator
      is biased downward with few clusters and its p-values are anti-conservative;
    - separation: all outcomes of one group equal (0 or 1), so the maximum-likelihood log odds
      ratio is infinite;
    - statsmodels missing, failing, or warning about convergence.
    """
    yv = np.asarray(y, dtype=float).reshape(-1)
    xv = np.asarray(x, dtype=float).reshape(-1)
    gv = np.asarray(groups).reshape(-1)
    if not (yv.size == xv.size == gv.size):
        raise ValueError(f"y, x and groups differ in length: {yv.size}, {xv.size}, {gv.size}")
    if not np.isin(yv, (0.0, 1.0)).all() or not np.isin(xv, (0.0, 1.0)).all():
        raise ValueError("gee_logistic needs 0/1 outcomes and a 0/1 group indicator")
    nan = float("nan")
    out: dict[str, Any] = {"log_odds": nan, "se": nan, "p_value": nan, "note": ""}
    cluster_x = pd.Series(xv).groupby(gv).agg(["min", "max"])
    if (cluster_x["min"] != cluster_x["max"]).any():
        raise ValueError("a cluster holds runs of both groups; clusters must be nested in groups")
    n_c1 = int((cluster_x["min"] == 1).sum())
    n_c0 = len(cluster_x) - n_c1
    if len(cluster_x) < min_clusters or min(n_c0, n_c1) < 2:
        out["note"] = (
            f"too few clusters ({n_c1} vs {n_c0} base models; need >= 2 per group and "
            f">= {min_clusters} in all)"
        )
        return out
    for level in (0.0, 1.0):
        yy = yv[xv == level]
        if yy.min() == yy.max():
            out["note"] = f"separation: every run of group x={int(level)} has outcome {int(yy[0])}"
            return out
    try:
        import statsmodels.api as sm
    except ImportError:
        out["note"] = "statsmodels not installed"
        return out
    exog = np.column_stack([np.ones_like(xv), xv])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = sm.GEE(
                yv,
                exog,
                groups=gv,
                family=sm.families.Binomial(),
                cov_struct=sm.cov_struct.Exchangeable(),
            )
            fit = model.fit()
        conv = [w for w in caught if "converge" in str(w.message).lower()]
        if conv:
            out["note"] = f"GEE did not converge: {conv[0].message}"
            return out
        b1, se, p = float(fit.params[1]), float(fit.bse[1]), float(fit.pvalues[1])
    except Exception as e:  # statsmodels raises several types on degenerate data
        out["note"] = f"GEE failed: {type(e).__name__}: {e}"
        return out
    if not all(math.isfinite(v) for v in (b1, se, p)):
        out["note"] = "GEE gave non-finite estimates"
        return out
    out.update(log_odds=b1, se=se, p_value=p)
    return out


def holm(p_values: Sequence[float] | Float[np.ndarray, "m"]) -> Float[np.ndarray, "m"]:
    """Holm step-down adjusted p-values (family-wise error control under any dependence).

    With the ``m`` finite p-values sorted ascending, ``p_(i)`` gets
    ``max_{j <= i} min(1, (m - j + 1) * p_(j))``; NaN entries stay NaN and are not counted in
    ``m``. Rejecting where the adjusted value is below ``alpha`` is Holm's procedure at ``alpha``.
    """
    p = np.asarray(p_values, dtype=float).reshape(-1)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    if finite.size == 0:
        return out
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    m = finite.size
    order = finite[np.argsort(p[finite], kind="mergesort")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


def cell_tests(
    results: pd.DataFrame,
    comparisons: Iterable[tuple[str, str]] = DEFAULT_COMPARISONS,
    margin: float = DEFAULT_MARGIN,
    alpha: float = RANDABL_ALPHA,
    alternative: str = "two-sided",
    max_exact: int = 100_000,
    n_perm: int = 20_000,
    seed: int = 0,
    min_clusters: int = 10,
) -> pd.DataFrame:
    """Base-model level tests of each init against its control, per (task, model, subroutine).

    For each ``(init, control_init)`` in ``comparisons`` and each (task, model, subroutine) where
    both have usable base models:

    - primary, ``p_value``: :func:`permutation_test` of the per-base-model compositional fraction
      (share of a base model's usable runs that are compositional), init vs control. It is the
      primary test because it is exact for any number of base models (the demo has about 5 per
      init): its only assumption is that base models are exchangeable under the null, which their
      independent seeds give. Asymptotic alternatives (GEE Wald tests, mixed models) rely on many
      clusters and are anti-conservative with a handful.
    - secondary: :func:`gee_logistic` on the run-level outcomes (compositional or not) with the
      base model as cluster: ``gee_log_odds``, ``gee_se``, ``gee_p``, ``gee_note`` (why NaN).

    ``p_holm`` is the Holm adjustment of ``p_value`` over every test in the returned table (the
    family of one experiment). ``test`` names the test (``"permutation exact (K relabelings)"``
    or ``"permutation monte carlo (K draws)"``); pairs where a side has no usable base model are
    left out. Other columns: ``n_base_models`` / ``_control``, ``base_models_compositional`` /
    ``_control``, ``mean_frac`` / ``_control`` and ``diff`` (their difference), ``alternative``.
    """
    bm = base_model_table(results, margin, alpha)
    bm = bm[bm["has_usable"]]
    runs = run_verdicts(results, margin, alpha)
    runs = runs[runs["usable"]]
    rows = []
    for i, (init, control) in enumerate(comparisons):
        if init == control:
            raise ValueError(f"a comparison needs two different inits, got {init!r} twice")
        for (task, model, sub), g in bm.groupby(["task", "model", "subroutine"], sort=True):
            ga, gb = g[g["init"] == init], g[g["init"] == control]
            if ga.empty or gb.empty:
                continue
            diff, p, method, n_rel = permutation_test(
                ga["frac_compositional"].to_numpy(),
                gb["frac_compositional"].to_numpy(),
                alternative=alternative,
                max_exact=max_exact,
                n_perm=n_perm,
                seed=seed + i,
            )
            r = runs[
                (runs["task"] == task)
                & (runs["model"] == model)
                & (runs["subroutine"] == sub)
                & runs["init"].isin([init, control])
            ]
            gee = gee_logistic(
                (r["verdict"] == COMPOSITIONAL).to_numpy(dtype=float),
                (r["init"] == init).to_numpy(dtype=float),
                (r["init"] + "/" + r["base_seed"].astype(str)).to_numpy(),
                min_clusters=min_clusters,
            )
            what = "relabelings" if method == "exact" else "draws"
            rows.append(
                {
                    "task": task,
                    "model": model,
                    "subroutine": sub,
                    "init": init,
                    "control_init": control,
                    "n_base_models": len(ga),
                    "n_base_models_control": len(gb),
                    "base_models_compositional": int(ga["mostly_compositional"].sum()),
                    "base_models_compositional_control": int(gb["mostly_compositional"].sum()),
                    "mean_frac": float(ga["frac_compositional"].mean()),
                    "mean_frac_control": float(gb["frac_compositional"].mean()),
                    "diff": diff,
                    "test": f"permutation {method} ({n_rel} {what})",
                    "alternative": alternative,
                    "p_value": p,
                    "gee_log_odds": gee["log_odds"],
                    "gee_se": gee["se"],
                    "gee_p": gee["p_value"],
                    "gee_note": gee["note"],
                }
            )
    cols = [
        "task", "model", "subroutine", "init", "control_init", "n_base_models",
        "n_base_models_control", "base_models_compositional", "base_models_compositional_control",
        "mean_frac", "mean_frac_control", "diff", "test", "alternative", "p_value",
        "gee_log_odds", "gee_se", "gee_p", "gee_note", "p_holm",
    ]  # fmt: skip
    out = pd.DataFrame(rows, columns=cols[:-1])
    out["p_holm"] = holm(out["p_value"].to_numpy(dtype=float)) if len(out) else []
    return out[cols]


def sign_flip_test(
    diffs: Sequence[float] | Float[np.ndarray, "n"],
    max_exact: int = 16,
    n_perm: int = 20_000,
    seed: int = 0,
) -> tuple[float, float, str, int]:
    """One-sided paired permutation test of ``mean(diffs) > 0`` (one difference per pair).

    Under the null each pair's two members are exchangeable, so each difference's sign is a fair
    coin. With at most ``max_exact`` pairs all ``2^n`` sign flips are enumerated and the p-value
    is exact: the share of flips whose mean is at least the observed one (the observed flip
    included); beyond that ``n_perm`` seeded random flips give ``(1 + #) / (1 + n_perm)``.
    Returns ``(mean diff, p_value, method, n_flips)``. Raises ``ValueError`` on no pairs or NaN.
    """
    d = np.asarray(diffs, dtype=float).reshape(-1)
    if d.size == 0:
        raise ValueError("sign_flip_test needs at least one pair")
    if np.isnan(d).any():
        raise ValueError("sign_flip_test differences contain NaN")
    observed = float(d.mean())
    tol = 1e-12 * max(1.0, abs(observed))
    if d.size <= max_exact:
        signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)
        means = (signs * d).mean(axis=1)
        return observed, float((means >= observed - tol).mean()), "exact", int(2**d.size)
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, d.size))
    count = int(((signs * d).mean(axis=1) >= observed - tol).sum())
    return observed, (1 + count) / (1 + n_perm), "monte carlo", n_perm


def paired_tests(
    results: pd.DataFrame,
    comparisons: Iterable[tuple[str, str]] = PAIRED_COMPARISONS,
    margin: float = DEFAULT_MARGIN,
    alpha: float = RANDABL_ALPHA,
    max_exact: int = 16,
    n_perm: int = 20_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired one-sided base-model tests (init > control), per (task, model, subroutine), for
    both analyses of docs/RESULTS_STATISTICS.md.

    Base models of two inits with the same ``base_seed`` share data and training seed: a pair.
    Per pair the difference of the base models' compositional shares, ``usable``:
    ``frac_compositional`` (both need usable runs), ``itt``: ``itt_frac_compositional`` (every
    run counts). :func:`sign_flip_test` gives the exact one-sided p-value. One row per
    (task, model, subroutine, init, control_init, analysis), also for a test that cannot run
    (an init absent, no complete pair): ``p_value`` NaN and ``note`` says why. ``p_holm``: Holm
    within each analysis over its tests. Columns: the keys, ``analysis``, ``n_pairs``,
    ``mean_frac``, ``mean_frac_control``, ``diff``, ``test``, ``p_value``, ``p_holm``, ``note``.
    """
    bm = base_model_table(results, margin, alpha)
    rows = []
    for i, (init, control) in enumerate(comparisons):
        if init == control:
            raise ValueError(f"a comparison needs two different inits, got {init!r} twice")
        for (task, model, sub), g in bm.groupby(["task", "model", "subroutine"], sort=True):
            for analysis in ANALYSES:
                col = "frac_compositional" if analysis == "usable" else "itt_frac_compositional"
                row: dict[str, Any] = {
                    "task": task, "model": model, "subroutine": sub, "init": init,
                    "control_init": control, "analysis": analysis, "n_pairs": 0,
                    "mean_frac": np.nan, "mean_frac_control": np.nan, "diff": np.nan,
                    "test": "", "p_value": np.nan, "note": "",
                }  # fmt: skip
                a = g[g["init"] == init].set_index("base_seed")[col]
                b = g[g["init"] == control].set_index("base_seed")[col]
                absent = [x for x, s in ((init, a), (control, b)) if s.empty]
                if absent:
                    row["note"] = f"no base model of init {', '.join(absent)} in this cell"
                    rows.append(row)
                    continue
                both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
                if both.empty:
                    row["note"] = (
                        f"no base seed has usable runs under both {init} and {control}"
                        if analysis == "usable"
                        else f"no base seed shared by {init} and {control}"
                    )
                    rows.append(row)
                    continue
                diff, p, method, n_rel = sign_flip_test(
                    (both["a"] - both["b"]).to_numpy(), max_exact, n_perm, seed + i
                )
                row.update(
                    n_pairs=len(both),
                    mean_frac=float(both["a"].mean()),
                    mean_frac_control=float(both["b"].mean()),
                    diff=diff,
                    test=f"sign-flip {method} ({n_rel} flips), one-sided {init} > {control}",
                    p_value=p,
                )
                rows.append(row)
    cols = [
        "task", "model", "subroutine", "init", "control_init", "analysis", "n_pairs",
        "mean_frac", "mean_frac_control", "diff", "test", "p_value", "p_holm", "note",
    ]  # fmt: skip
    out = pd.DataFrame(rows, columns=[c for c in cols if c != "p_holm"])
    out["p_holm"] = np.nan
    for analysis in ANALYSES:
        sel = out["analysis"] == analysis
        if sel.any():
            out.loc[sel, "p_holm"] = holm(out.loc[sel, "p_value"].to_numpy(dtype=float))
    return out[cols]


def _paired_wide(paired: pd.DataFrame) -> pd.DataFrame:
    """:func:`paired_tests` as summary.csv columns, one row per (task, model, subroutine, init):
    ``paired_vs_<control>_<analysis>_{n_pairs,diff,p,p_holm,note}``."""
    keys = ["task", "model", "subroutine", "init"]
    wide: dict[tuple, dict[str, Any]] = {}
    for r in paired.to_dict("records"):
        pre = f"paired_vs_{r['control_init']}_{r['analysis']}"
        d = wide.setdefault(tuple(r[k] for k in keys), dict(zip(keys, [r[k] for k in keys])))
        d.update({
            f"{pre}_n_pairs": r["n_pairs"], f"{pre}_diff": r["diff"], f"{pre}_p": r["p_value"],
            f"{pre}_p_holm": r["p_holm"], f"{pre}_note": r["note"],
        })  # fmt: skip
    return pd.DataFrame(list(wide.values()))


def summary_table(
    results: pd.DataFrame,
    comparisons: Iterable[tuple[str, str]] = DEFAULT_COMPARISONS,
    margin: float = DEFAULT_MARGIN,
    alpha: float = RANDABL_ALPHA,
    level: float = 0.95,
    **test_kwargs: Any,
) -> pd.DataFrame:
    """What ``summary.csv`` holds: :func:`summarize_cells` joined with :func:`cell_tests`.

    One row per (task, model, init, subroutine). ``control_init``, ``test``, ``p_value``,
    ``p_holm``, ``gee_p`` and ``gee_note`` are those of the test comparing this cell with its
    control cell (same task, model and subroutine); they are empty / NaN for a cell that is only
    a control (e.g. ``random_init``) or whose control is absent. Each init may have at most one
    control in ``comparisons``. ``test_kwargs`` go to :func:`cell_tests`. Then the paired
    one-sided tests (:func:`paired_tests`, :data:`PAIRED_COMPARISONS`, both analyses) as
    ``paired_vs_<control>_<analysis>_*`` columns on the row of the tested init.
    """
    comparisons = list(comparisons)
    inits = [a for a, _ in comparisons]
    if len(set(inits)) != len(inits):
        raise ValueError(f"each init may be compared with one control only, got {comparisons}")
    cells = summarize_cells(results, margin, alpha, level)
    tests = cell_tests(results, comparisons, margin, alpha, **test_kwargs)
    keep = ["control_init", "test", "p_value", "p_holm", "gee_log_odds", "gee_se", "gee_p"]
    keep.append("gee_note")
    merged = cells.merge(
        tests[["task", "model", "subroutine", "init", *keep]],
        on=["task", "model", "subroutine", "init"],
        how="left",
    )
    for c in ("control_init", "test", "gee_note"):
        merged[c] = merged[c].fillna("")
    wide = _paired_wide(paired_tests(results, PAIRED_COMPARISONS, margin, alpha))
    if len(wide):
        merged = merged.merge(wide, on=["task", "model", "subroutine", "init"], how="left")
        for c in [c for c in wide.columns if c.endswith("_note")]:
            merged[c] = merged[c].fillna("")
    return merged


# ============================================================================ 4. agreement


def expected_jaccard(n: int, k_a: int, k_b: int) -> float:
    """Expected Jaccard index of a fixed ``k_a``-subset and a uniformly random ``k_b``-subset.

    The overlap ``X`` is hypergeometric (population ``n``, ``k_a`` marked, ``k_b`` drawn) and
    ``J = X / (k_a + k_b - X)``, so ``E[J] = sum_x P(X = x) x / (k_a + k_b - x)``. NaN when both
    sets are empty.
    """
    from scipy.stats import hypergeom

    if not (0 <= k_a <= n and 0 <= k_b <= n):
        raise ValueError(f"need 0 <= k_a, k_b <= n, got n={n}, k_a={k_a}, k_b={k_b}")
    if k_a + k_b == 0:
        return float("nan")
    x = np.arange(max(0, k_a + k_b - n), min(k_a, k_b) + 1)
    pmf = hypergeom.pmf(x, n, k_a, k_b)
    return float((pmf * x / (k_a + k_b - x)).sum())


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def spearman_permutation(
    a: Sequence[float] | Float[np.ndarray, "n"],
    b: Sequence[float] | Float[np.ndarray, "n"],
    alternative: str = "two-sided",
    n_perm: int = 2000,
    max_exact: int = 40_320,
    seed: int = 0,
) -> tuple[float, float]:
    """Spearman correlation of ``a`` and ``b`` (tie-aware) and its permutation p-value.

    Under the null the pairing is arbitrary: all ``n!`` orderings of ``b`` are equally likely.
    With ``n! <= max_exact`` all are enumerated (exact p = share at least as extreme); otherwise
    ``n_perm`` seeded shuffles give ``(1 + #extreme) / (1 + n_perm)``. Returns ``(rho, p)``; both
    NaN when a vector is constant or ``n < 2``.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    x = np.asarray(a, dtype=float).reshape(-1)
    y = np.asarray(b, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"vectors differ in length: {x.size} vs {y.size}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("spearman_permutation values contain NaN")
    nan = float("nan")
    if x.size < 2:
        return nan, nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    if den == 0:
        return nan, nan
    rho = float((rx * ry).sum() / den)
    tol = 1e-12

    def _count(stats: np.ndarray) -> int:
        if alternative == "two-sided":
            return int((np.abs(stats) >= abs(rho) - tol).sum())
        if alternative == "greater":
            return int((stats >= rho - tol).sum())
        return int((stats <= rho + tol).sum())

    n = x.size
    if math.factorial(n) <= max_exact:
        perms = np.array(list(itertools.permutations(range(n))), dtype=np.int64)
        stats = (ry[perms] @ rx) / den
        return rho, float(_count(stats) / len(perms))
    rng = np.random.default_rng(seed)
    count, done, chunk = 0, 0, max(1, min(n_perm, 2_000_000 // n))
    while done < n_perm:
        m = min(chunk, n_perm - done)
        shuffled = rng.permuted(np.tile(ry, (m, 1)), axis=1)
        count += _count(shuffled @ rx / den)
        done += m
    return rho, float((1 + count) / (1 + n_perm))


def auc_mannwhitney(
    scores: Sequence[float] | Float[np.ndarray, "n"],
    labels: Sequence[bool] | Bool[np.ndarray, "n"],
    alternative: str = "two-sided",
) -> tuple[float, float]:
    """ROC AUC of ``scores`` for positive ``labels`` and the Mann-Whitney p-value of AUC = 0.5.

    AUC = ``U / (n_pos n_neg)`` with ``U`` the Mann-Whitney statistic of the positives, from
    average ranks (a tie between a positive and a negative counts 1/2). The p-value is
    ``scipy.stats.mannwhitneyu`` (exact for small samples without ties, normal approximation with
    tie correction otherwise); ``"greater"`` tests AUC > 0.5. ``(nan, nan)`` when a class is empty.
    """
    from scipy.stats import mannwhitneyu

    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    r = _ranks(s)
    auc = float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    if s.min() == s.max():
        return auc, 1.0
    p = float(mannwhitneyu(s[y], s[~y], alternative=alternative).pvalue)
    return auc, p


def matched_jaccard(
    kept: Bool[np.ndarray, "n"], scores: Float[np.ndarray, "n"]
) -> tuple[int, float, float, float]:
    """Jaccard of ``kept`` with the top-``k`` units by score, ``k = kept.sum()``, and its null.

    Returns ``(k, jaccard, expected, p)``: ``expected`` = :func:`expected_jaccard` of a random
    ``k``-subset, ``p`` = P(overlap of a random ``k``-subset >= observed overlap) (hypergeometric
    tail; larger overlap means larger Jaccard at fixed size). Ties in score at the cut are broken
    by unit order. NaNs when ``k`` is 0.
    """
    from scipy.stats import hypergeom

    kept = np.asarray(kept).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=float).reshape(-1)
    n, k = kept.size, int(kept.sum())
    if k == 0:
        return 0, float("nan"), float("nan"), float("nan")
    top = np.zeros(n, dtype=bool)
    top[np.argsort(-s, kind="stable")[:k]] = True
    x = int((top & kept).sum())
    j = x / (2 * k - x)
    p = float(hypergeom.sf(x - 1, n, k, k))
    return k, float(j), expected_jaccard(n, k, k), p


def forward_order_scores(layers: Sequence[int], kinds: Sequence[str]) -> Float[np.ndarray, "n"]:
    """A trivial baseline ranking: earlier units score higher (layer first, then kind).

    Within a layer, kinds are ordered by their first appearance in the unit list (heads before
    neurons in the usual layer-major unit order). Units of one (layer, kind) tie.
    """
    layers = np.asarray(layers, dtype=int).reshape(-1)
    kinds = np.asarray(kinds).astype(str).reshape(-1)
    kind_rank = {k: i for i, k in enumerate(dict.fromkeys(kinds.tolist()))}
    key = layers * (len(kind_rank) + 1) + np.array([kind_rank[k] for k in kinds])
    return -key.astype(float)


def agreement_table(
    kept: Bool[np.ndarray, "n_units"],
    scores: Float[np.ndarray, "n_units"],
    layers: Sequence[int],
    kinds: Sequence[str],
    mask_params: Float[np.ndarray, "n_units"] | None = None,
    baseline_scores: Float[np.ndarray, "n_units"] | None = None,
    use_abs: bool = True,
    alternative: str = "two-sided",
    n_perm: int = 2000,
    seed: int = 0,
    include_pooled: bool = True,
) -> pd.DataFrame:
    """Agreement of a mask with patching scores per unit kind and per (kind, layer), with nulls.

    Pooling heads and neurons mixes scores on different scales, so the rows that matter are
    ``scope="kind"`` (one per kind: "head", "neuron", "channel", ...) and ``scope="kind_layer"``;
    a ``scope="pooled"`` row (``kind="all"``) is added for reference when ``include_pooled``.
    ``layer`` is -1 on rows that span layers. Per row:

    - ``n_units``, ``k`` (units the mask keeps), ``jaccard`` of the kept set with the top-``k``
      units by score, ``expected_jaccard`` of a random ``k``-subset and ``jaccard_p``
      (hypergeometric, see :func:`matched_jaccard`);
    - ``spearman`` of scores with ``mask_params`` (e.g. mask logits; the kept indicator when not
      given) and its permutation ``spearman_p`` (:func:`spearman_permutation`);
    - ``auc`` of scores for the kept units and its Mann-Whitney ``auc_p``
      (:func:`auc_mannwhitney`);
    - ``baseline_spearman``, ``baseline_auc``: the same statistics for ``baseline_scores``
      (default :func:`forward_order_scores`, earlier layers first). A baseline AUC far from 0.5
      on a row means the unit order alone separates kept units there; it is NaN on rows whose
      baseline scores are constant (e.g. one kind and layer).

    Scores are taken in absolute value when ``use_abs``.
    """
    kept = np.asarray(kept).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=float).reshape(-1)
    layers_a = np.asarray(layers, dtype=int).reshape(-1)
    kinds_a = np.asarray(kinds).astype(str).reshape(-1)
    n = kept.size
    for name, arr in (("scores", s), ("layers", layers_a), ("kinds", kinds_a)):
        if arr.size != n:
            raise ValueError(f"{name} has {arr.size} entries but the mask has {n} units")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if use_abs:
        s = np.abs(s)
    params = kept.astype(float) if mask_params is None else np.asarray(mask_params, dtype=float)
    params = params.reshape(-1)
    base = (
        forward_order_scores(layers_a, kinds_a)
        if baseline_scores is None
        else np.asarray(baseline_scores, dtype=float).reshape(-1)
    )
    for name, arr in (("mask_params", params), ("baseline_scores", base)):
        if arr.size != n:
            raise ValueError(f"{name} has {arr.size} entries but the mask has {n} units")

    groups: list[tuple[str, str, int, np.ndarray]] = []
    if include_pooled:
        groups.append(("pooled", "all", -1, np.ones(n, dtype=bool)))
    for kind in dict.fromkeys(kinds_a.tolist()):
        groups.append(("kind", kind, -1, kinds_a == kind))
    for kind in dict.fromkeys(kinds_a.tolist()):
        for layer in sorted(set(layers_a[kinds_a == kind].tolist())):
            groups.append(("kind_layer", kind, layer, (kinds_a == kind) & (layers_a == layer)))

    rows = []
    for i, (scope, kind, layer, sel) in enumerate(groups):
        kk, ss, pp, bb = kept[sel], s[sel], params[sel], base[sel]
        k, j, ej, jp = matched_jaccard(kk, ss)
        rho, rho_p = spearman_permutation(ss, pp, alternative, n_perm, seed=seed + i)
        auc, auc_p = auc_mannwhitney(ss, kk, alternative)
        b_rho, _ = spearman_permutation(bb, pp, alternative, n_perm=1, max_exact=0)
        b_auc, _ = auc_mannwhitney(bb, kk, alternative)
        if bb.min() == bb.max():
            b_rho = b_auc = float("nan")
        rows.append(
            {
                "scope": scope,
                "kind": kind,
                "layer": layer,
                "n_units": int(sel.sum()),
                "k": k,
                "jaccard": j,
                "expected_jaccard": ej,
                "jaccard_p": jp,
                "spearman": rho,
                "spearman_p": rho_p,
                "auc": auc,
                "auc_p": auc_p,
                "baseline_spearman": b_rho,
                "baseline_auc": b_auc,
            }
        )
    return pd.DataFrame(rows)


# ============================================================================ 5. per-run bootstrap


def problem_bootstrap(
    target_correct: Bool[np.ndarray, "n_target"],
    other_correct: Bool[np.ndarray, "n_other"],
    chance: float = 0.25,
    margin: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    *,
    n_target: int | None = None,
    n_other: int | None = None,
) -> dict[str, float]:
    """Bootstrap over test problems of one run's clipped difference.

    The difference is ``max(acc_target, chance) - max(acc_other, chance)`` with accuracies the
    means of the per-problem correctness vectors (the paper's ``sub_diff`` / ``abl_diff``). Each
    replicate resamples the problems of each partition with replacement, independently (the two
    partitions are separate problem sets). Returns ``diff``, ``se`` (bootstrap standard
    deviation), percentile bounds ``lo`` / ``hi`` and ``p_le_margin`` = ``(1 + #{boot <= margin})
    / (1 + n_boot)``, a one-sided bootstrap p-value for ``diff > margin``. For ``abl_diff <
    -margin`` swap the two partitions: the clipped difference changes sign.

    With ``n_target`` and ``n_other`` (the numbers of problems) given, ``target_correct`` and
    ``other_correct`` are the numbers of correctly solved problems instead of the per-problem
    vectors: a resample depends on a vector only through its count, so both forms give the
    same numbers for the same seed.
    """
    if (n_target is None) != (n_other is None):
        raise ValueError("give both n_target and n_other, or neither")
    if n_target is None:
        t = np.asarray(target_correct).astype(float).reshape(-1)
        o = np.asarray(other_correct).astype(float).reshape(-1)
        nt, no = t.size, o.size
        if nt == 0 or no == 0:
            raise ValueError(f"both partitions need problems, got {nt} and {no}")
        pt, po = t.mean(), o.mean()
    else:
        counts = []
        for k, n, what in ((target_correct, n_target, "target"), (other_correct, n_other, "other")):
            kf, nf = float(k), float(n)
            if not (kf.is_integer() and nf.is_integer() and 0 <= kf <= nf and nf >= 1):
                raise ValueError(f"{what}: need integers 0 <= correct <= n, n >= 1; got {k}, {n}")
            counts.append((int(kf), int(nf)))
        (kt, nt), (ko, no) = counts
        pt, po = kt / nt, ko / no
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    # resampling a 0/1 vector = drawing the number of correct problems from Binomial(n, acc)
    bt = rng.binomial(nt, pt, n_boot) / nt
    bo = rng.binomial(no, po, n_boot) / no
    boot = np.maximum(bt, chance) - np.maximum(bo, chance)
    diff = max(pt, chance) - max(po, chance)
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return {
        "diff": float(diff),
        "se": float(boot.std(ddof=1)) if n_boot > 1 else float("nan"),
        "lo": float(lo),
        "hi": float(hi),
        "p_le_margin": float((1 + np.count_nonzero(boot <= margin)) / (1 + n_boot)),
    }


def straddles_margin(row: Mapping[str, Any] | pd.Series, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether a run's margin decision could flip under resampling of its test problems.

    A flag to read beside :func:`margins_ok`: True when the run's bootstrap interval over test
    problems (:func:`problem_bootstrap`; columns ``sub_diff_lo`` / ``sub_diff_hi`` and
    ``abl_diff_lo`` / ``abl_diff_hi`` of results.csv) for ``sub_diff`` contains ``+margin``
    (``lo <= margin <= hi``) or the one for ``abl_diff`` contains ``-margin``: on a resampled
    test set that margin could be passed where it is failed now, or failed where it is passed.
    A pair whose bound is absent or NaN (rows written before the intervals existed) says
    nothing: it counts as not straddling, so such a row gives False.
    """

    def bounds(name: str) -> tuple[float, float] | None:
        try:
            lo, hi = float(row.get(f"{name}_lo")), float(row.get(f"{name}_hi"))
        except (TypeError, ValueError):
            return None
        return None if math.isnan(lo) or math.isnan(hi) else (lo, hi)

    sub, abl = bounds("sub_diff"), bounds("abl_diff")
    return bool(
        (sub is not None and sub[0] <= margin <= sub[1])
        or (abl is not None and abl[0] <= -margin <= abl[1])
    )
