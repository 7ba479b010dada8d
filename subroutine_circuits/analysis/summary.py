"""The tables of an experiment folder: ``summary.csv``, ``overlap.csv`` and ``agreement.csv``.

Everything here is plain pandas / numpy / scipy (torch only to read saved masks and score files).
The input is the experiment output folder written by
:func:`subroutine_circuits.experiment.run_experiment`:

- ``results.csv``: one row per base model x mask seed x subroutine (see docs/RESULTS.md);
- ``manifest.json``: ``{"config", "margin", "chance", "versions", "device", "timings", ...}``;
- ``masks/*.pt``: saved masks (read through :func:`load_mask_units`);
- ``patching/*.pt``: per-unit patching score files (their ``agreement`` tables).

The statistics themselves live in :mod:`subroutine_circuits.analysis.inference`: the base model
is the unit of analysis (mask seeds of one base model search the same weights and are not
independent), intervals are exact (Clopper-Pearson) or Student-t over base-model means, and the
tests of one init against its control are exact permutation tests over base models with Holm's
correction over the experiment's family (GEE columns as a secondary reading). This module adds
what needs the folder: the margin from the manifest, per-kind densities from the masks, the A/B
mask overlap and the mask-vs-patching agreement per unit kind and layer.
"""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool
from torch import Tensor

from subroutine_circuits.analysis import inference
from subroutine_circuits.store import RunStore
from subroutine_circuits.utils import CHANCE as CHANCE  # re-exported for the report
from subroutine_circuits.utils import atomic_write_text

DEFAULT_MARGIN = inference.DEFAULT_MARGIN

#: The cells a summary is computed for.
GROUP_KEYS: tuple[str, ...] = inference.CELL_KEYS
#: Columns :func:`load_results` insists on.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "task",
    "model",
    "init",
    "base_seed",
    "mask_seed",
    "subroutine",
    "sub_diff",
    "abl_diff",
)
#: Boolean columns coerced when present, with the value an empty cell takes.
_BOOL_COLUMNS: dict[str, bool | None] = {
    "base_ok": True,
    "bypass": False,
    "mask_ok": True,
    "residual_path": False,
    "compositional": None,
    "margins_ok": None,
    "paper_compositional": None,
}
#: File name of the agreement table in an experiment folder.
AGREEMENT_CSV = "agreement.csv"
#: Verdicts whose runs enter the per-kind densities (the mask search succeeded on a usable base
#: model; a run that passes the margins may still lack a random control).
_DENSITY_VERDICTS = (inference.COMPOSITIONAL, inference.NOT_COMPOSITIONAL, inference.NO_CONTROL)


# ----------------------------------------------------------------------------- loading


def _as_bool(series: pd.Series, name: str, default: bool | None = None) -> pd.Series:
    """Coerce a column of bools / 0-1 / 'True'-'False' strings to bool, or raise naming it.

    With ``default``, empty (NaN) cells take that value; without, they raise."""
    if series.dtype == bool:
        return series
    if default is not None:
        series = series.where(series.notna(), default)
    mapping = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
    out = series.map(lambda v: mapping.get(str(v).strip().lower()))
    if out.isna().any():
        bad = series[out.isna()].iloc[0]
        raise ValueError(f"column {name!r} must hold booleans, found {bad!r}")
    return out.astype(bool)


def validate_results(results: pd.DataFrame) -> pd.DataFrame:
    """Check the columns of a results table and return a copy with boolean columns as bool.

    Raises ``ValueError`` naming the missing columns. Optional columns written by newer versions
    (``mask_ok``, ``randabl_p``, ``bypass``, ``verdict``, ``margins_ok``,
    ``paper_compositional``) may be absent: see :func:`inference.validate_runs` for how their
    absence is read (the verdict columns are recomputed by :func:`inference.run_verdicts`).
    """
    if not isinstance(results, pd.DataFrame):
        raise ValueError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}")
    out = results.copy()
    for c, default in _BOOL_COLUMNS.items():
        if c in out.columns:
            out[c] = _as_bool(out[c], c, default)
    if "base_ok" not in out.columns:
        out["base_ok"] = True
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


def margin_of(out_dir: str | os.PathLike) -> float:
    """The verdict margin recorded in the manifest (default :data:`DEFAULT_MARGIN`)."""
    return float(load_manifest(out_dir).get("margin", DEFAULT_MARGIN))


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
    fraction of readable masks of that cell keeping the unit. With ``only_ok`` only masks that
    may enter a verdict count: base model usable (``base_ok``, no ``bypass``) and mask search
    succeeded (``mask_ok``; absent flags do not filter). Empty when no mask can be read.
    """
    df = load_results(out_dir)
    if "mask_path" not in df.columns:
        return pd.DataFrame()
    if only_ok:
        keep = df["base_ok"].copy()
        if "bypass" in df.columns:
            keep &= ~df["bypass"]
        if "mask_ok" in df.columns:
            keep &= df["mask_ok"]
        df = df[keep]
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


# ----------------------------------------------------------------------------- densities


def kind_densities(out_dir: str | os.PathLike, results: pd.DataFrame) -> pd.DataFrame:
    """Share of units of each kind a run's mask keeps (heads, neurons, channels, ...).

    One row per (run, kind) for the rows of ``results`` whose ``mask_path`` can be read as a
    unit mask: the run keys, ``kind``, ``n_units``, ``n_kept`` and ``density = n_kept /
    n_units``. Pooled densities hide that a mask keeping 3 of 8 heads and 1% of the neurons is
    a head circuit; this table keeps them apart. Empty when no mask can be read.
    """
    if "mask_path" not in results.columns:
        return pd.DataFrame()
    keys = [*GROUP_KEYS, "base_seed", "mask_seed"]
    rows = []
    for rec in results.to_dict("records"):
        path = resolve_mask_path(out_dir, rec["mask_path"])
        if path is None:
            continue
        try:
            flat, units = load_mask_units(path)
        except (ValueError, OSError, RuntimeError):
            continue
        kinds = np.array([u[1] for u in units])
        for kind in dict.fromkeys(kinds.tolist()):
            sel = kinds == kind
            n_kept = int(flat[sel].sum())
            row = {k: rec[k] for k in keys}
            row.update(kind=kind, n_units=int(sel.sum()), n_kept=n_kept)
            row["density"] = n_kept / int(sel.sum())
            rows.append(row)
    return pd.DataFrame(rows)


def cell_densities(
    out_dir: str | os.PathLike, results: pd.DataFrame, margin: float
) -> pd.DataFrame:
    """Per cell, the mean share of each unit kind kept (``density_<kind>`` columns).

    Means over the runs whose mask search succeeded on a usable base model (verdict
    compositional, not compositional, or no random control). Empty without readable masks.
    """
    runs = inference.run_verdicts(results, margin)
    runs = runs[runs["verdict"].isin(_DENSITY_VERDICTS)]
    dens = kind_densities(out_dir, runs)
    if dens.empty:
        return pd.DataFrame(columns=list(GROUP_KEYS))
    wide = dens.pivot_table(
        index=list(GROUP_KEYS), columns="kind", values="density", aggfunc="mean"
    )
    wide.columns = [f"density_{k}" for k in wide.columns]
    return wide.reset_index()


# ----------------------------------------------------------------------------- summary


def summary_frame(
    out_dir: str | os.PathLike, results: pd.DataFrame | None = None, margin: float | None = None
) -> pd.DataFrame:
    """What ``summary.csv`` holds: :func:`inference.summary_table` plus densities.

    One row per (task, model, init, subroutine): base-model counts with their Clopper-Pearson
    interval, run counts (usable, search failed, excluded, no random control, compositional),
    the paper criterion's run and base-model counts beside them (``paper_*``: margins only, no
    random control), t intervals of the mean ``sub_diff`` / ``abl_diff`` over base models, the
    permutation test against the control init with ``p_value`` / ``p_holm`` (Holm over the
    experiment's family) and the GEE columns; then ``density_mean`` (mean ``density`` column
    of the same runs as the per-kind densities) and ``density_<kind>`` per unit kind
    (:func:`cell_densities`).
    ``margin`` defaults to the manifest's.
    """
    results = load_results(out_dir) if results is None else validate_results(results)
    margin = margin_of(out_dir) if margin is None else float(margin)
    table = inference.summary_table(results, margin=margin)
    runs = inference.run_verdicts(results, margin)
    runs = runs[runs["verdict"].isin(_DENSITY_VERDICTS)]
    if "density" in runs.columns and len(runs):
        dens = runs.groupby(list(GROUP_KEYS))["density"].mean().rename("density_mean")
        table = table.merge(dens.reset_index(), on=list(GROUP_KEYS), how="left")
    else:
        table["density_mean"] = np.nan
    kinds = cell_densities(out_dir, results, margin)
    if len(kinds.columns) > len(GROUP_KEYS):
        table = table.merge(kinds, on=list(GROUP_KEYS), how="left")
    return table


# ----------------------------------------------------------------------------- agreement


def load_score_files(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-unit patching score files of a folder (``patching/**/*.pt`` and ``scores_*.pt``).

    Only dicts holding ``scores`` and ``units`` are returned (each with ``_file``, its name).
    """
    import torch

    out_dir = Path(out_dir)
    pdir = RunStore(out_dir).patching_dir
    files = sorted(pdir.rglob("*.pt")) if pdir.is_dir() else []
    files += sorted(out_dir.glob("scores_*.pt"))
    found = []
    for p in files:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception:  # an unreadable or foreign file is skipped, not fatal
            continue
        if isinstance(obj, dict) and "scores" in obj and "units" in obj:
            found.append({**obj, "_file": p.name})
    return found


#: Keys of a score file copied into each of its agreement rows.
_AGREEMENT_KEYS = ("task", "init", "base_seed", "mask_seed", "subroutine", "method")


def agreement_frame(out_dir: str | os.PathLike) -> pd.DataFrame:
    """``agreement.csv``: mask-vs-patching agreement per unit kind and layer, with nulls.

    Stacks the ``agreement`` tables of the score files (computed by the patching driver with
    :func:`inference.agreement_table`), prefixed with the file's task, init, base seed, mask
    seed, subroutine and method and the file name (``scores_file``). Empty when no score file
    holds one (patching off, or no mask to compare with).
    """
    parts = []
    for obj in load_score_files(out_dir):
        table = obj.get("agreement")
        if not table:
            continue
        df = pd.DataFrame(table)
        prefix = {k: obj.get(k) for k in _AGREEMENT_KEYS}
        prefix["scores_file"] = obj["_file"]
        for k, v in reversed(list(prefix.items())):
            df.insert(0, k, v)
        parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ----------------------------------------------------------------------------- writing


def _csv(df: pd.DataFrame) -> str:
    """A DataFrame as CSV text (no index)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()


_OVERLAP_COLUMNS = [
    *_RUN_KEYS, "subroutine_a", "subroutine_b", "base_ok", "layer", "kind",
    "n_units", "n_a", "n_b", "n_shared", "n_union", "jaccard",
]  # fmt: skip


def write_summary(out_dir: str | os.PathLike) -> Path:
    """Write ``OUT/summary.csv`` (:func:`summary_frame`), ``OUT/overlap.csv``
    (:func:`overlap_table`) and, when patching score files hold agreement tables,
    ``OUT/agreement.csv`` (:func:`agreement_frame`). All written atomically; overlap.csv is a
    header line when no masks could be read. Returns the path of summary.csv."""
    out_dir = Path(out_dir)
    store = RunStore(out_dir)
    results = load_results(out_dir)
    summary = summary_frame(out_dir, results)
    path = store.summary_csv
    atomic_write_text(path, _csv(summary))
    overlap = overlap_table(out_dir)
    if overlap.empty:
        overlap = pd.DataFrame(columns=_OVERLAP_COLUMNS)
    atomic_write_text(store.overlap_csv, _csv(overlap))
    agreement = agreement_frame(out_dir)
    if not agreement.empty:
        atomic_write_text(store.root / AGREEMENT_CSV, _csv(agreement))
    return path
