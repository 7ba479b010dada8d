"""Patching circuits for every base model x subroutine of an experiment, compared with its masks.

For each base model (of the inits in ``cfg.patching_inits``) and subroutine, the mask of the
first mask seed is compared with the activation- and attribution-patching circuits of the same
subroutine (see ``subroutine_circuits.patching.run_patching``). Each (base model, subroutine)
writes one JSON file under ``OUT/patching/rows/`` (the unit of resumption); ``patching.csv`` is
assembled from them. The runner calls :func:`patch_base_model` inside its worker processes;
:func:`run_patching_all` catches up on anything missing and writes the CSV.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.utils import atomic_write_json, atomic_write_text


def _rows_dir(out: Path) -> Path:
    return Path(out) / "patching" / "rows"


def patch_base_model(
    cfg: ExperimentConfig, out: Path, prep, bid: str, init: str, seed: int, model, meta: dict
) -> None:
    """Patching rows for every subroutine of one base model (skips finished ones)."""
    from subroutine_circuits.masks import load_mask
    from subroutine_circuits.patching.run import PatchingConfig, run_patching

    if not cfg.patching or init not in cfg.patching_inits:
        return
    out = Path(out)
    for sub in prep.subroutines:
        row_path = _rows_dir(out) / f"{bid}__{sub}.json"
        if row_path.exists():
            continue
        mask_path = out / "masks" / f"{bid}__{sub}__m{cfg.mask_seeds[0]}.pt"
        mask = load_mask(mask_path, model) if mask_path.exists() else None
        if mask is not None and not hasattr(mask, "unit_map"):
            mask = None  # weight masks: patching works on units, compare without a mask
        pcfg = PatchingConfig(
            **{
                "methods": tuple(cfg.patching_methods),
                "n_pairs": cfg.patching_pairs,
                "seed": seed,
                "pool": cfg.model.pool,
                "cross_ablation": cfg.ablation,
                "out_dir": str(out / "patching"),
                "meta": {"task": prep.label, "init": init, "base_seed": seed},
                **cfg.patching_options,
            }
        )
        rows = run_patching(
            model, prep.tokenizer, prep.task, sub, prep.splits["test"], mask=mask, cfg=pcfg
        )
        for r in rows:
            r["composite_acc"] = meta.get("composite_acc")
            r["mask_seed"] = cfg.mask_seeds[0] if mask is not None else None
        atomic_write_json(row_path, _jsonable(rows))


def run_patching_all(cfg: ExperimentConfig, out: Path, prep=None):
    """Patch any base model still missing rows, then write ``patching.csv``; returns it.

    ``prep`` (the runner's task, tokenizer and splits) is built from ``cfg`` when not given.
    """
    import pandas as pd

    from subroutine_circuits.experiment.runner import base_id, prepare, resolve_device
    from subroutine_circuits.models import load_checkpoint

    out = Path(out)
    prep = prep if prep is not None else prepare(cfg)
    for init in cfg.patching_inits if cfg.patching else []:
        if init not in cfg.inits:
            continue
        for seed in cfg.base_seeds:
            bid = base_id(prep.label, init, seed)
            model_dir = out / "models" / bid
            done = all((_rows_dir(out) / f"{bid}__{s}.json").exists() for s in prep.subroutines)
            if done or not (model_dir / "meta.json").exists():
                continue
            model, _, meta = load_checkpoint(model_dir)
            model.to(resolve_device(cfg.device)).eval()
            patch_base_model(cfg, out, prep, bid, init, seed, model, meta)
    all_rows: list[dict[str, Any]] = []
    for p in sorted(_rows_dir(out).glob("*.json")):
        all_rows.extend(json.loads(p.read_text()))
    df = pd.DataFrame(all_rows)
    atomic_write_text(out / "patching.csv", df.to_csv(index=False))
    return df


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convert tensors / numpy scalars in result rows to plain Python values."""
    clean = []
    for r in rows:
        d = {}
        for k, v in r.items():
            if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
                v = v.item()
            elif hasattr(v, "tolist"):
                v = v.tolist()
            d[k] = v
        clean.append(d)
    return clean
