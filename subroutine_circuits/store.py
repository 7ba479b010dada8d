"""The run store: the one object that owns an experiment folder's layout and resumption.

Layout of an experiment folder ``OUT``::

    config.json                      the configuration the folder was started with
    models/<base_id>/                base-model checkpoints
    search/<base_id>__<sub>.json     mask hyperparameters chosen on validation data
    masks/<run_key>.pt               final masks
    runs/<run_key>.json              one finished results row each (the unit of resumption:
                                     a rerun skips every run whose file exists, never rewrites it)
    patching/rows/<base_id>__<sub>.json   patching rows of one base model x subroutine
    patching/frontier/<base_id>__<sub>.json   frontier rows of one base model x subroutine
                                     (written before the patching rows, which mark it done)
    patching/scores_*.pt             per-unit patching scores
    circuits/<meta>_<sub>_<mask|method>.json   circuits as MIB / EAP-IG JSON
    results.csv summary.csv overlap.csv patching.csv frontier.csv manifest.json report.html

with ``<base_id> = <task>__<init>__s<seed>`` and ``<run_key> = <base_id>__<sub>__m<mask_seed>``.
Everything that reads or writes these paths (the study, the statistics, the report) asks a
:class:`RunStore`; nothing else spells them out. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from subroutine_circuits.utils import atomic_write_json, atomic_write_text


def base_id(task: str, init: str, seed: int) -> str:
    """Folder/file stem of one base model: ``<task>__<init>__s<seed>``."""
    return f"{task}__{init}__s{int(seed)}"


def run_key(bid: str, subroutine: str, mask_seed: int) -> str:
    """Stem of one run (base model x subroutine x mask seed)."""
    return f"{bid}__{subroutine}__m{int(mask_seed)}"


class RunStore:
    """Paths and resumption state of one experiment folder (created on first write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def __reduce__(self):  # picklable as its root
        return (RunStore, (str(self.root),))

    # ------------------------------------------------------------------ names
    base_id = staticmethod(base_id)
    run_key = staticmethod(run_key)

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        """``config.json``."""
        return self.root / "config.json"

    @property
    def manifest_path(self) -> Path:
        """``manifest.json``."""
        return self.root / "manifest.json"

    @property
    def results_csv(self) -> Path:
        """``results.csv``."""
        return self.root / "results.csv"

    @property
    def summary_csv(self) -> Path:
        """``summary.csv``."""
        return self.root / "summary.csv"

    @property
    def overlap_csv(self) -> Path:
        """``overlap.csv``."""
        return self.root / "overlap.csv"

    @property
    def patching_csv(self) -> Path:
        """``patching.csv``."""
        return self.root / "patching.csv"

    @property
    def circuits_dir(self) -> Path:
        """``circuits/`` (MIB / EAP-IG circuit JSON of every mask and patching circuit)."""
        return self.root / "circuits"

    @property
    def frontier_csv(self) -> Path:
        """``frontier.csv``."""
        return self.root / "frontier.csv"

    @property
    def report_path(self) -> Path:
        """``report.html``."""
        return self.root / "report.html"

    @property
    def patching_dir(self) -> Path:
        """``patching/`` (per-unit score files)."""
        return self.root / "patching"

    @property
    def runs_dir(self) -> Path:
        """``runs/``."""
        return self.root / "runs"

    @property
    def models_dir(self) -> Path:
        """``models/``."""
        return self.root / "models"

    def model_dir(self, bid: str) -> Path:
        """``models/<base_id>/``."""
        return self.models_dir / bid

    def has_model(self, bid: str) -> bool:
        """Whether a complete checkpoint of ``bid`` exists (its ``meta.json`` is written last)."""
        return (self.model_dir(bid) / "meta.json").exists()

    def search_path(self, bid: str, subroutine: str) -> Path:
        """``search/<base_id>__<sub>.json``."""
        return self.root / "search" / f"{bid}__{subroutine}.json"

    def mask_rel(self, key: str) -> str:
        """The mask path of run ``key`` relative to the root (as stored in results.csv)."""
        return f"masks/{key}.pt"

    def mask_path(self, key: str) -> Path:
        """``masks/<run_key>.pt``."""
        return self.root / self.mask_rel(key)

    def resolve(self, rel: Any) -> Path | None:
        """A path stored relative to the root (e.g. ``mask_path`` column) -> absolute, or None."""
        if rel is None or (isinstance(rel, float) and rel != rel) or str(rel) == "":
            return None
        p = Path(str(rel))
        return p if p.is_absolute() else self.root / p

    def run_path(self, key: str) -> Path:
        """``runs/<run_key>.json``."""
        return self.runs_dir / f"{key}.json"

    def patching_rows_dir(self) -> Path:
        """``patching/rows/``."""
        return self.patching_dir / "rows"

    def patching_row_path(self, bid: str, subroutine: str) -> Path:
        """``patching/rows/<base_id>__<sub>.json``."""
        return self.patching_rows_dir() / f"{bid}__{subroutine}.json"

    # ------------------------------------------------------------------ resumption
    def run_done(self, key: str) -> bool:
        """Whether run ``key`` has finished (its row file exists)."""
        return self.run_path(key).exists()

    def write_run(self, key: str, row: dict[str, Any]) -> None:
        """Write one finished run's row (atomic)."""
        atomic_write_json(self.run_path(key), row)

    def read_runs(self) -> list[dict[str, Any]]:
        """Every finished run's row, in file-name order."""
        return [json.loads(p.read_text()) for p in sorted(self.runs_dir.glob("*.json"))]

    def read_search(self, bid: str, subroutine: str) -> dict[str, Any] | None:
        """The saved hyperparameter search of ``bid`` x ``subroutine`` (None if not done)."""
        p = self.search_path(bid, subroutine)
        return json.loads(p.read_text()) if p.exists() else None

    def write_search(self, bid: str, subroutine: str, chosen: dict[str, Any]) -> None:
        """Save the hyperparameter search of ``bid`` x ``subroutine``."""
        atomic_write_json(self.search_path(bid, subroutine), chosen)

    def patching_done(self, bid: str, subroutines: Iterable[str]) -> bool:
        """Whether every subroutine of ``bid`` has its patching rows."""
        return all(self.patching_row_path(bid, s).exists() for s in subroutines)

    def write_patching_rows(self, bid: str, subroutine: str, rows: list[dict[str, Any]]) -> None:
        """Write the patching rows of ``bid`` x ``subroutine``."""
        atomic_write_json(self.patching_row_path(bid, subroutine), rows)

    def read_patching_rows(self) -> list[dict[str, Any]]:
        """All patching rows, in file-name order."""
        return _read_rows(self.patching_rows_dir())

    def frontier_row_path(self, bid: str, subroutine: str) -> Path:
        """``patching/frontier/<base_id>__<sub>.json``."""
        return self.patching_dir / "frontier" / f"{bid}__{subroutine}.json"

    def write_frontier_rows(self, bid: str, subroutine: str, rows: list[dict[str, Any]]) -> None:
        """Write the frontier rows of ``bid`` x ``subroutine`` (before its patching rows)."""
        atomic_write_json(self.frontier_row_path(bid, subroutine), rows)

    def read_frontier_rows(self) -> list[dict[str, Any]]:
        """All frontier rows, in file-name order."""
        return _read_rows(self.patching_dir / "frontier")

    def read_manifest(self) -> dict[str, Any]:
        """``manifest.json`` (empty dict if absent or unreadable)."""
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write ``manifest.json``."""
        atomic_write_json(self.manifest_path, manifest)

    def write_csv(self, path: Path, df: Any) -> None:
        """Write a DataFrame as CSV (atomic, no index)."""
        atomic_write_text(path, df.to_csv(index=False))

    def check_same_config(self, current: dict[str, Any], resumable: Sequence[str] = ()) -> None:
        """Refuse to resume into a folder written with a different configuration.

        Finished runs are never recomputed, so mixing configurations would silently mix
        results. The first call writes ``config.json``; later ones must match it except for the
        keys in ``resumable`` (settings that do not change any result).
        """
        current = json.loads(json.dumps(current, default=str))
        if not self.config_path.exists():
            atomic_write_json(self.config_path, current)
            return
        saved = json.loads(self.config_path.read_text())
        for key in sorted(set(saved) | set(current)):
            if key in resumable:
                continue
            if saved.get(key) != current.get(key):
                raise ValueError(
                    f"{self.root} holds results of a different configuration: {key!r} was "
                    f"{saved.get(key)!r}, now {current.get(key)!r}; use another --out folder"
                )


def _read_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of every ``*.json`` list file in ``folder``, in file-name order."""
    out: list[dict[str, Any]] = []
    for p in sorted(folder.glob("*.json")):
        out.extend(json.loads(p.read_text()))
    return out
