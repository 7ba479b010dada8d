"""Statistics over an experiment folder: clustered bootstrap CIs, frequency tests, mask overlap.

Everything here is plain pandas / numpy / scipy (torch only to read saved masks). The input is the
experiment output folder written by :func:`subroutine_circuits.experiment.run_experiment`:

- ``results.csv``: one row per base model x mask seed x subroutine (columns listed in
  :data:`REQUIRED_COLUMNS` and more);
- ``manifest.json``: ``{"config", "margin", "chance", "versions", "device", "timings",
  "excluded_base_models"}``;
- ``masks/*.pt``: saved masks (read through :func:`load_mask_units`).

Runs of one base model are not independent (they share its weights), so every confidence interval
is a *cluster* bootstrap: resample base models with replacement, then take all their mask-seed rows.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool
from torch import Tensor

from subroutine_circuits.store import RunStore
from subroutine_circuits.utils import CHANCE as CHANCE  # re-exported for the report
from subroutine_circuits.utils import atomic_write_text

DEFAULT_MARGIN = 0.05

#: The cells a summary is computed for.
GROUP_KEYS: tuple[str, ...] = ("task", "model", "init", "subroutine")
#: Columns whose mean and clustered 95% CI :func:`summarize` reports.
CI_COLUMNS: tuple[str, ...] = ("sub_diff", "abl_diff", "randabl_diff", "density")
#: Columns :func:`load_results` insists on.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "task",
    "model",
    "init",
    "base_seed",
    "mask_seed",
    "subroutine",
    "base_ok",
    "compositional",
    "sub_diff",
    "abl_diff",
)
_BOOL_COLUMNS = ("base_ok", "compositional")
#: The frequency comparisons :func:`frequency_tests` runs when both inits are present.
DEFAULT_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("trained", "random_init"),
    ("pretrained", "trained"),
    ("pretrained", "random_init"),
)


# ----------------------------------------------------------------------------- loading


def _as_bool(series: pd.Series, name: str) -> pd.Series:
    """Coerce a column of bools / 0-1 / 'True'-'False' strings to bool, or raise naming it."""
    if series.dtype == bool:
        return series
    mapping = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
    out = series.map(lambda v: mapping.get(str(v).strip().lower()))
    if out.isna().any():
        bad = series[out.isna()].iloc[0]
        raise ValueError(f"column {name!r} must hold booleans, found {bad!r}")
    return out.astype(bool)


def validate_results(results: pd.DataFrame) -> pd.DataFrame:
    """Check the columns of a results table and return a copy with boolean columns as bool.

    Raises ``ValueError`` naming the missing columns, or an empty table.
    """
    if not isinstance(results, pd.DataFrame):
        raise ValueError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}")
    out = results.copy()
    for c in _BOOL_COLUMNS:
        out[c] = _as_bool(out[c], c)
    for c in ("task", "model", "init", "subroutine"):
        out[c] = out[c].astype(str)
    return out


def load_results(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``OUT/results.csv``."""
    path = RunStore(out_dir).results_csv
    if not path.exists():
        raise FileNotFoundError(f"no results.csv in {out_dir}")
    df = pd.read_csv(path)
    if df.empty:
        raise ValueError(f"{path} has no rows")
    return validate_results(df)


def load_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``OUT/manifest.json``; an absent manifest gives ``{}``."""
    path = RunStore(out_dir).manifest_path
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


# ----------------------------------------------------------------------------- bootstrap


def cluster_bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[Any] | np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of ``values`` and a percentile bootstrap CI, resampling whole clusters.

    Each bootstrap replicate draws as many clusters as there are, with replacement, and takes the
    mean over all rows of the drawn clusters (so a cluster drawn twice counts twice).
    ``clusters=None`` makes every row its own cluster (the ordinary row-wise bootstrap). NaN values
    are dropped first. Returns ``(mean, lo, hi)``; all NaN when no value is left, and NaN
    ``lo``/``hi`` when fewer than two clusters remain (one base model says nothing about the
    spread between base models, so no interval is claimed).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.asarray(values, dtype=float)
    c = np.arange(len(v)) if clusters is None else np.asarray(clusters)
    if c.shape != v.shape:
        raise ValueError(f"values and clusters differ in length: {v.shape} vs {c.shape}")
    keep = ~np.isnan(v)
    v, c = v[keep], c[keep]
    if len(v) == 0:
        return (float("nan"),) * 3
    _, inv = np.unique(c, return_inverse=True)
    sums = np.bincount(inv, weights=v)
    counts = np.bincount(inv).astype(float)
    k = len(sums)
    if k < 2:
        return float(v.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, k, size=(n_boot, k))
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(v.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------- summaries


def summarize(results: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (task, model, init, subroutine): counts and clustered-bootstrap CIs over usable runs.

    Only rows with ``base_ok`` enter the statistics. Columns: the group keys, ``n_base_models``,
    ``n_runs``, ``n_compositional``, ``frac_compositional`` (+ ``_lo``/``_hi``), for each of
    ``sub_diff, abl_diff, randabl_diff, density`` its ``_mean``, ``_lo`` and ``_hi`` (95% CI from
    a bootstrap clustered by base model, i.e. ``base_seed``), and ``n_excluded_base_models`` /
    ``n_excluded_runs`` (rows with ``base_ok`` False). A cell whose base models were all excluded
    still gets a row, with ``n_runs`` 0 and NaN statistics.
    """
    df = validate_results(results)
    rows = []
    for i, (key, g) in enumerate(df.groupby(list(GROUP_KEYS), sort=True)):
        ok = g[g["base_ok"]]
        bad = g[~g["base_ok"]]
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key))
        row["n_base_models"] = int(ok["base_seed"].nunique())
        row["n_runs"] = len(ok)
        row["n_compositional"] = int(ok["compositional"].sum())
        clusters = ok["base_seed"].to_numpy()
        m, lo, hi = cluster_bootstrap_ci(
            ok["compositional"].astype(float).to_numpy(), clusters, n_boot, seed + i
        )
        row.update(frac_compositional=m, frac_compositional_lo=lo, frac_compositional_hi=hi)
        for col in CI_COLUMNS:
            if col in ok.columns:
                vals = pd.to_numeric(ok[col], errors="coerce").to_numpy(dtype=float)
                m, lo, hi = cluster_bootstrap_ci(vals, clusters, n_boot, seed + i)
            else:
                m = lo = hi = float("nan")
            row.update({f"{col}_mean": m, f"{col}_lo": lo, f"{col}_hi": hi})
        row["n_excluded_base_models"] = int(bad["base_seed"].nunique())
        row["n_excluded_runs"] = len(bad)
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(row: pd.Series | dict, margin: float = DEFAULT_MARGIN) -> str:
    """A one-word reading of a :func:`summarize` row.

    ``"compositional"`` when the CI of ``sub_diff`` lies above ``margin`` and the CI of
    ``abl_diff`` lies below ``-margin``; ``"not compositional"`` when the sub CI lies at or below
    ``margin`` or the abl CI at or above ``-margin`` (the pattern is excluded by the CIs);
    ``"inconclusive"`` otherwise; ``"no usable runs"`` without rows; ``"too few base models"``
    when the CIs are undefined (fewer than two usable base models).
    """
    if int(row["n_runs"]) == 0 or np.isnan(row["sub_diff_mean"]):
        return "no usable runs"
    if any(np.isnan(row[c]) for c in ("sub_diff_lo", "sub_diff_hi", "abl_diff_lo", "abl_diff_hi")):
        return "too few base models"
    if row["sub_diff_lo"] > margin and row["abl_diff_hi"] < -margin:
        return "compositional"
    if row["sub_diff_hi"] <= margin or row["abl_diff_lo"] >= -margin:
        return "not compositional"
    return "inconclusive"


def compare_frequencies(
    results: pd.DataFrame,
    a: str = "trained",
    b: str = "random_init",
    alternative: str = "two-sided",
) -> pd.DataFrame:
    """Fisher exact test of compositional frequency, init ``a`` vs init ``b``.

    One row per (task, model, subroutine) where both inits have usable (``base_ok``) runs:
    ``k_a, n_a, k_b, n_b`` (compositional / total runs), ``frac_a, frac_b``, the sample
    ``odds_ratio`` and ``p_value`` of ``scipy.stats.fisher_exact([[k_a, n_a-k_a], [k_b,
    n_b-k_b]])``. Note that the test treats runs as independent although mask seeds of one base
    model are not; read it together with the clustered CIs of :func:`summarize`.
    """
    from scipy.stats import fisher_exact

    if a == b:
        raise ValueError(f"compare_frequencies needs two different inits, got {a!r} twice")
    df = validate_results(results)
    df = df[df["base_ok"]]
    rows = []
    for (task, model, sub), g in df.groupby(["task", "model", "subroutine"], sort=True):
        ga, gb = g[g["init"] == a], g[g["init"] == b]
        if ga.empty or gb.empty:
            continue
        k_a, n_a = int(ga["compositional"].sum()), len(ga)
        k_b, n_b = int(gb["compositional"].sum()), len(gb)
        res = fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]], alternative=alternative)
        rows.append(
            {
                "task": task,
                "model": model,
                "subroutine": sub,
                "init_a": a,
                "init_b": b,
                "k_a": k_a,
                "n_a": n_a,
                "k_b": k_b,
                "n_b": n_b,
                "frac_a": k_a / n_a,
                "frac_b": k_b / n_b,
                "odds_ratio": float(res.statistic),
                "p_value": float(res.pvalue),
            }
        )
    cols = ["task", "model", "subroutine", "init_a", "init_b", "k_a", "n_a", "k_b", "n_b"]
    cols += ["frac_a", "frac_b", "odds_ratio", "p_value"]
    return pd.DataFrame(rows, columns=cols)


def frequency_tests(
    results: pd.DataFrame, comparisons: Iterable[tuple[str, str]] = DEFAULT_COMPARISONS
) -> pd.DataFrame:
    """:func:`compare_frequencies` for every pair in ``comparisons``, stacked in one table."""
    parts = [compare_frequencies(results, a, b) for a, b in comparisons]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------- masks


def _units_of(unit_map: Any) -> list[tuple[int, str, int]]:
    """(layer, kind, index) per unit from a UnitMap (``.units()``) or a list of triples."""
    units = unit_map.units() if hasattr(unit_map, "units") else unit_map
    out = []
    for u in units:
        if len(u) != 3:
            raise ValueError(f"a unit must be (layer, kind, index), got {u!r}")
        out.append((int(u[0]), str(u[1]), int(u[2])))
    return out


def mask_overlap(
    mask_a_flat: Bool[Tensor, "n_units"] | np.ndarray,
    mask_b_flat: Bool[Tensor, "n_units"] | np.ndarray,
    unit_map: Any,
) -> pd.DataFrame:
    """Overlap of two binary unit masks over the same unit map, per (layer, kind) and overall.

    ``unit_map`` is a ``UnitMap`` or a list of ``(layer, kind, index)`` triples in flat order.
    Returns rows with ``layer`` (-1 for the overall row), ``kind`` ("all" overall), ``n_units``,
    ``n_a``, ``n_b`` (units kept by each mask), ``n_shared`` (kept by both), ``n_union`` and
    ``jaccard = n_shared / n_union`` (NaN when neither mask keeps a unit of that group).
    """
    a = np.asarray(mask_a_flat.cpu() if isinstance(mask_a_flat, Tensor) else mask_a_flat)
    b = np.asarray(mask_b_flat.cpu() if isinstance(mask_b_flat, Tensor) else mask_b_flat)
    a, b = a.astype(bool).reshape(-1), b.astype(bool).reshape(-1)
    units = _units_of(unit_map)
    if not (len(a) == len(b) == len(units)):
        raise ValueError(
            f"mask sizes differ: mask_a {len(a)}, mask_b {len(b)}, unit map {len(units)} units"
        )
    layers = np.array([u[0] for u in units])
    kinds = np.array([u[1] for u in units])
    groups = list(dict.fromkeys(zip(layers.tolist(), kinds.tolist())))
    rows = []

    def _row(layer: int, kind: str, sel: np.ndarray) -> dict[str, Any]:
        sa, sb = a[sel], b[sel]
        shared, union = int((sa & sb).sum()), int((sa | sb).sum())
        return {
            "layer": layer,
            "kind": kind,
            "n_units": int(sel.sum()),
            "n_a": int(sa.sum()),
            "n_b": int(sb.sum()),
            "n_shared": shared,
            "n_union": union,
            "jaccard": shared / union if union else float("nan"),
        }

    for layer, kind in groups:
        rows.append(_row(layer, kind, (layers == layer) & (kinds == kind)))
    rows.append(_row(-1, "all", np.ones(len(a), dtype=bool)))
    return pd.DataFrame(rows)


def load_mask_units(path: str | os.PathLike) -> tuple[np.ndarray, list[tuple[int, str, int]]]:
    """Adapter: a saved mask file -> (flat boolean array over units, (layer, kind, index) units).

    Tries ``subroutine_circuits.masks.load_mask(path)`` (a mask with ``flat_binary()`` and
    ``unit_map.units()``); when that is unavailable or fails, reads the file with ``torch.load``
    and accepts a dict holding ``"flat"`` (bool tensor/array) and ``"units"`` (triples), the
    simple format used by test fixtures. Raises ``ValueError`` naming the file otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mask file not found: {path}")
    st = path.stat()
    flat, units = _load_mask_units_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)
    return flat.copy(), list(units)


@functools.lru_cache(maxsize=4096)
def _load_mask_units_cached(
    path_str: str, mtime_ns: int, size: int
) -> tuple[np.ndarray, tuple[tuple[int, str, int], ...]]:
    """:func:`load_mask_units` for one version of a file (keyed by path, mtime and size)."""
    flat, units = _read_mask_units(Path(path_str))
    return flat, tuple(units)


def _read_mask_units(path: Path) -> tuple[np.ndarray, list[tuple[int, str, int]]]:
    """Read a mask file through masks.load_mask, else as the fixture dict format."""
    import torch

    first_error: Exception | None = None
    try:
        from subroutine_circuits.masks import load_mask  # type: ignore[attr-defined]

        mask = load_mask(path)
        flat = mask.flat_binary()
        flat = flat.detach().cpu().numpy() if isinstance(flat, Tensor) else np.asarray(flat)
        return flat.astype(bool).reshape(-1), _units_of(mask.unit_map)
    except Exception as e:  # masks/ not there yet, or a file in the fixture format
        first_error = e
    with open(path, "rb") as f:
        obj = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "flat" in obj and "units" in obj:
        flat = obj["flat"]
        flat = flat.cpu().numpy() if isinstance(flat, Tensor) else np.asarray(flat)
        return flat.astype(bool).reshape(-1), _units_of(obj["units"])
    raise ValueError(f"cannot read a unit mask from {path}: {first_error}")


def resolve_mask_path(out_dir: str | os.PathLike, mask_path: Any) -> Path | None:
    """The file a ``mask_path`` cell of results.csv points to (relative to OUT/ or OUT/masks/)."""
    if mask_path is None or (isinstance(mask_path, float) and np.isnan(mask_path)):
        return None
    p = Path(str(mask_path))
    store = RunStore(out_dir)
    for cand in (p, store.resolve(p), store.mask_path(p.stem)):
        if cand.is_file():
            return cand
    return None


_RUN_KEYS = ["task", "model", "init", "base_seed", "mask_seed"]


def overlap_table(out_dir: str | os.PathLike) -> pd.DataFrame:
    """A/B mask overlap for every base model x mask seed of an experiment folder.

    For each (task, model, init, base_seed, mask_seed) with exactly two subroutine rows whose mask
    files can be read, returns the :func:`mask_overlap` rows prefixed with those keys and
    ``subroutine_a`` / ``subroutine_b`` (alphabetical) and ``base_ok``. Runs whose masks are
    missing or unreadable (e.g. weight masks) are skipped.
    """
    df = load_results(out_dir)
    if "mask_path" not in df.columns:
        return pd.DataFrame()
    parts = []
    for key, g in df.groupby(_RUN_KEYS, sort=True):
        g = g.sort_values("subroutine")
        if len(g) != 2:
            continue
        loaded = []
        for mp in g["mask_path"]:
            p = resolve_mask_path(out_dir, mp)
            if p is None:
                break
            try:
                loaded.append(load_mask_units(p))
            except (ValueError, OSError, RuntimeError):
                break
        if len(loaded) != 2 or len(loaded[0][0]) != len(loaded[1][0]):
            continue
        ov = mask_overlap(loaded[0][0], loaded[1][0], loaded[0][1])
        subs = g["subroutine"].tolist()
        prefix = dict(zip(_RUN_KEYS, key))
        prefix.update(subroutine_a=subs[0], subroutine_b=subs[1], base_ok=bool(g["base_ok"].all()))
        for k, v in reversed(list(prefix.items())):
            ov.insert(0, k, v)
        parts.append(ov)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def kept_frequency(out_dir: str | os.PathLike, only_ok: bool = True) -> pd.DataFrame:
    """How often each unit is kept across mask seeds (and base models), per init and subroutine.

    Returns rows (task, model, init, subroutine, layer, kind, index, freq, n_masks), ``freq`` the
    fraction of readable masks of that cell keeping the unit. Rows of excluded base models are
    left out when ``only_ok``. Empty when no mask can be read.
    """
    df = load_results(out_dir)
    if "mask_path" not in df.columns:
        return pd.DataFrame()
    if only_ok:
        df = df[df["base_ok"]]
    parts = []
    for key, g in df.groupby(["task", "model", "init", "subroutine"], sort=True):
        flats, units = [], None
        for mp in g["mask_path"]:
            p = resolve_mask_path(out_dir, mp)
            if p is None:
                continue
            try:
                flat, u = load_mask_units(p)
            except (ValueError, OSError, RuntimeError):
                continue
            if units is None:
                units = u
            if u == units:
                flats.append(flat)
        if not flats:
            continue
        freq = np.mean(np.stack(flats).astype(float), axis=0)
        part = pd.DataFrame(units, columns=["layer", "kind", "index"])
        part["freq"] = freq
        part["n_masks"] = len(flats)
        for k, v in reversed(list(zip(["task", "model", "init", "subroutine"], key))):
            part.insert(0, k, v)
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ----------------------------------------------------------------------------- writing


def _csv(df: pd.DataFrame) -> str:
    """A DataFrame as CSV text (no index)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()


def write_summary(out_dir: str | os.PathLike, n_boot: int = 2000, seed: int = 0) -> Path:
    """Write ``OUT/summary.csv`` (group statistics + frequency tests) and ``OUT/overlap.csv``.

    summary.csv stacks :func:`summarize` rows (``kind="group"``, with a ``verdict`` column using
    the manifest's margin) and :func:`frequency_tests` rows (``kind="test"``); columns a kind does
    not use are empty. overlap.csv holds :func:`overlap_table` (empty file with a header line when
    no masks could be read). Both are written atomically. Returns the path of summary.csv.
    """
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    margin = float(load_manifest(out_dir).get("margin", DEFAULT_MARGIN))
    groups = summarize(results, n_boot=n_boot, seed=seed)
    groups["verdict"] = [verdict(r, margin) for _, r in groups.iterrows()]
    groups.insert(0, "kind", "group")
    tests = frequency_tests(results)
    if not tests.empty:
        tests.insert(0, "kind", "test")
    summary = pd.concat([groups, tests], ignore_index=True) if not tests.empty else groups
    path = RunStore(out_dir).summary_csv
    atomic_write_text(path, _csv(summary))
    overlap = overlap_table(out_dir)
    if overlap.empty:
        overlap = pd.DataFrame(
            columns=_RUN_KEYS
            + ["subroutine_a", "subroutine_b", "base_ok", "layer", "kind"]
            + ["n_units", "n_a", "n_b", "n_shared", "n_union", "jaccard"]
        )
    atomic_write_text(RunStore(out_dir).overlap_csv, _csv(overlap))
    return path
