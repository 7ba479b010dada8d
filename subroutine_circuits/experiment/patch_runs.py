"""Patching circuits for every base model x subroutine of an experiment, compared with its masks.

For each finished base model and subroutine, the mask of the first mask seed is compared with
the activation- and attribution-patching circuits of the same subroutine (see
``subroutine_circuits.patching.run_patching``). Each (base model, subroutine) writes one JSON
file under ``OUT/patching/rows/`` (the unit of resumption); ``patching.csv`` is assembled from
them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.utils import atomic_write_json, atomic_write_text


def run_patching_all(cfg: ExperimentConfig, out: Path, progress: bool = False):
    """Run (or resume) the patching comparison; writes ``patching.csv`` and returns it."""
    import pandas as pd
    from tqdm.auto import tqdm

    from subroutine_circuits.experiment.runner import base_id, prepare, resolve_device
    from subroutine_circuits.masks import load_mask
    from subroutine_circuits.models import load_checkpoint
    from subroutine_circuits.patching.run import PatchingConfig, run_patching

    out = Path(out)
    device = resolve_device(cfg.device)
    prep = prepare(cfg)
    rows_dir = out / "patching" / "rows"
    jobs = [(init, seed) for init in cfg.inits for seed in cfg.base_seeds]
    for init, seed in tqdm(jobs, disable=not progress, desc="patching"):
        bid = base_id(prep.label, init, seed)
        model_dir = out / "models" / bid
        if not (model_dir / "meta.json").exists():
            continue
        todo = [s for s in prep.subroutines if not (rows_dir / f"{bid}__{s}.json").exists()]
        if not todo:
            continue
        model, _, meta = load_checkpoint(model_dir)
        model.to(device).eval()
        for sub in todo:
            mask_path = out / "masks" / f"{bid}__{sub}__m{cfg.mask_seeds[0]}.pt"
            mask = load_mask(mask_path, model) if mask_path.exists() else None
            if mask is not None and not hasattr(mask, "unit_map"):
                mask = None  # weight masks: patching works on units, compare without a mask
            pcfg = PatchingConfig(
                methods=tuple(cfg.patching_methods),
                n_pairs=cfg.patching_pairs,
                seed=seed,
                pool=cfg.model.pool,
                out_dir=str(out / "patching"),
                meta={"task": prep.label, "init": init, "base_seed": seed},
            )
            rows = run_patching(
                model, prep.tokenizer, prep.task, sub, prep.splits["test"], mask=mask, cfg=pcfg
            )
            for r in rows:
                r["composite_acc"] = meta.get("composite_acc")
                r["mask_seed"] = cfg.mask_seeds[0] if mask is not None else None
            atomic_write_json(rows_dir / f"{bid}__{sub}.json", _jsonable(rows))
    all_rows: list[dict[str, Any]] = []
    for p in sorted(rows_dir.glob("*.json")):
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
