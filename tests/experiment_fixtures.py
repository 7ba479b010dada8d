"""A synthetic experiment folder (results.csv, manifest, masks) with a planted truth, shared by
the analysis and report tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subroutine_circuits.utils import clipped_diff

SUBS = ("subject_plural", "verb_plural")
N_LAYERS, N_HEADS, D_MLP = 2, 4, 8


def synth_units() -> list[tuple[int, str, int]]:
    """Units of a small unit map: per layer 4 heads then 8 neurons."""
    units = []
    for layer in range(N_LAYERS):
        units += [(layer, "head", h) for h in range(N_HEADS)]
        units += [(layer, "neuron", n) for n in range(D_MLP)]
    return units


def save_fixture_mask(path: Path, flat: np.ndarray) -> None:
    """A mask file in the simple fixture format that stats.load_mask_units accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"flat": torch.as_tensor(flat, dtype=torch.bool), "units": synth_units()}, path)


def make_experiment(
    out_dir: Path | None = None,
    inits: tuple[str, ...] = ("trained", "pretrained", "random_init"),
    n_base: int = 3,
    n_mask: int = 3,
    seed: int = 0,
    task: str = "agreement_singular",
    legacy: bool = False,
) -> pd.DataFrame:
    """A synthetic results table (and, with ``out_dir``, results.csv, manifest.json and masks).

    Trained/pretrained models show the compositional pattern most of the time, random-init ones
    rarely; base seed 2 of "trained" fails the composite task (base_ok False). The verdict
    columns of the current version are written too (``legacy=True`` leaves them out, as in
    results written before the matched random control): ``randabl_p`` (0.02 for compositional
    runs, else 0.4), ``mask_ok`` (False for mask seed 1 of pretrained base seed 0 and subroutine
    SUBS[0]: a failed search), ``mask_val_acc``, ``bypass`` (False) and ``verdict``;
    ``compositional`` follows the verdict rule.
    """
    rng = np.random.default_rng(seed)
    rows = []
    units = synth_units()
    for init in inits:
        p_comp = {"trained": 0.7, "pretrained": 0.9, "random_init": 0.1}[init]
        for base_seed in range(n_base):
            composite = 0.5 if (init == "trained" and base_seed == 2) else 0.97
            if init == "random_init":
                composite = 0.3
            base_ok = composite >= 0.9 or init == "random_init"
            for mask_seed in range(n_mask):
                for sub, other in (SUBS, SUBS[::-1]):
                    comp = rng.random() < p_comp
                    if comp:
                        sub_t, sub_o = 0.9 + 0.05 * rng.random(), 0.3 * rng.random()
                        abl_t, abl_o = 0.3 * rng.random(), 0.9 + 0.05 * rng.random()
                    else:
                        sub_t, sub_o = 0.6 * rng.random(), 0.6 * rng.random()
                        abl_t, abl_o = 0.9, 0.9 - 0.02 * rng.random()
                    rand_t, rand_o = 0.95, 0.94
                    flat = rng.random(len(units)) < 0.3
                    mask_name = f"{task}__{init}__s{base_seed}__{sub}__m{mask_seed}.pt"
                    if out_dir is not None:
                        save_fixture_mask(out_dir / "masks" / mask_name, flat)
                    sub_diff = float(clipped_diff(sub_t, sub_o))
                    abl_diff = float(clipped_diff(abl_t, abl_o))
                    mask_ok = not (init == "pretrained" and base_seed == 0 and mask_seed == 1)
                    mask_ok = mask_ok or sub != SUBS[0]
                    randabl_p = 0.02 if comp else 0.4
                    pattern = sub_diff > 0.05 and abl_diff < -0.05 and randabl_p < 0.05
                    if not base_ok:
                        verdict = "excluded"
                    elif not mask_ok:
                        verdict = "search failed"
                    else:
                        verdict = "compositional" if pattern else "not compositional"
                    new_cols = {
                        "mask_ok": mask_ok,
                        "mask_val_acc": 0.95 if mask_ok else 0.6,
                        "randabl_p": randabl_p,
                        "randabl_diff_mean": float(clipped_diff(rand_t, rand_o)),
                        "randabl_n_distinct": 39,
                        "bypass": False,
                        "verdict": verdict,
                    }
                    legacy_comp = bool(sub_diff > 0.05 and abl_diff < -0.05)
                    rows.append(
                        {
                            "task": task,
                            "model": "tiny",
                            "init": init,
                            "base_seed": base_seed,
                            "mask_seed": mask_seed,
                            "subroutine": sub,
                            "other": other,
                            "mask_kind": "unit",
                            "density": float(flat.mean()),
                            "n_kept": int(flat.sum()),
                            "composite_acc": composite,
                            "base_ok": base_ok,
                            "full_target_acc": 0.97,
                            "full_other_acc": 0.96,
                            "sub_target_acc": sub_t,
                            "sub_other_acc": sub_o,
                            "sub_sub_acc": 0.95,
                            "abl_target_acc": abl_t,
                            "abl_other_acc": abl_o,
                            "ablmean_target_acc": abl_t,
                            "ablmean_other_acc": abl_o,
                            "randabl_target_acc": rand_t,
                            "randabl_other_acc": rand_o,
                            "sub_diff": sub_diff,
                            "abl_diff": abl_diff,
                            "randabl_diff": float(clipped_diff(rand_t, rand_o)),
                            "compositional": legacy_comp if legacy else verdict == "compositional",
                            "mask_path": f"masks/{mask_name}",
                            "hparams": json.dumps({"l0_lambda": 1e-3}),
                            "val_score": 0.5,
                            **({} if legacy else new_cols),
                        }
                    )
    df = pd.DataFrame(rows)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        df.to_csv(out_dir / "results.csv", index=False)
        manifest = {
            "config": {"task": task, "model": "tiny", "n_base": n_base, "n_mask": n_mask},
            "margin": 0.05,
            "chance": 0.25,
            "versions": {"torch": torch.__version__},
            "device": "cpu",
            "timings": {"total_s": 12.5},
            "excluded_base_models": [f"{task}__trained__s2"] if "trained" in inits else [],
        }
        (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return df


# ----------------------------------------------------------------------------- bootstrap
