"""Run the whole study: base models x inits x subroutines x mask seeds, resumably.

``run_experiment(cfg, out_dir)`` validates the configuration, prepares the task and splits
once, plans one :class:`~subroutine_circuits.experiment.jobs.BaseModelJob` per (init, base
seed), runs them with an executor (in-process or worker processes), then assembles
``results.csv`` and ``patching.csv``, the summary statistics, the manifest and the report. The
folder layout belongs to :class:`~subroutine_circuits.store.RunStore`.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path
from typing import Any

from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.experiment.data import Prepared, prepare
from subroutine_circuits.store import RunStore
from subroutine_circuits.utils import resolve_device

#: Column order of results.csv (each column is documented in docs/RESULTS.md).
RESULT_COLUMNS = [
    "task", "model", "init", "base_seed", "mask_seed", "subroutine", "other", "mask_kind",
    "verdict", "compositional", "base_ok", "bypass", "mask_ok", "mask_val_acc", "mask_steps",
    "mask_best_step", "mask_stopped_early", "mask_final_temp", "ablation",
    "density", "n_kept", "density_head", "density_neuron", "n_kept_head", "n_kept_neuron",
    "composite_acc", "composite_val_acc", "full_target_acc", "full_other_acc",
    "full_sub_acc", "sub_target_acc", "sub_other_acc", "sub_sub_acc", "abl_target_acc",
    "abl_other_acc", "ablzero_target_acc", "ablzero_other_acc", "ablmean_target_acc",
    "ablmean_other_acc", "ablresample_target_acc", "ablresample_other_acc",
    "ablreinit_target_acc", "ablreinit_other_acc", "randabl_target_acc", "randabl_other_acc",
    "sub_diff", "abl_diff", "ablzero_diff", "ablmean_diff", "ablresample_diff", "ablreinit_diff",
    "randabl_diff", "randabl_diff_mean", "randabl_p", "randabl_n_distinct", "n_random",
    "mask_path", "hparams", "val_score",
]  # fmt: skip

# Settings that do not change any result: a folder may be resumed with other values of these.
RESUMABLE_FIELDS = ("workers", "device", "patching", "patching_inits", "executor")


def collect_results(out: str | os.PathLike):
    """Assemble ``results.csv`` from the finished run files; returns the DataFrame."""
    import pandas as pd

    store = RunStore(out)
    df = pd.DataFrame(store.read_runs())
    if len(df):
        cols = [c for c in RESULT_COLUMNS if c in df.columns]
        df = df[cols + [c for c in df.columns if c not in cols]]
        df = df.sort_values(["task", "init", "base_seed", "subroutine", "mask_seed"])
    store.write_csv(store.results_csv, df)
    return df


def collect_patching(out: str | os.PathLike):
    """Assemble ``patching.csv`` from the patching rows; returns the DataFrame."""
    import pandas as pd

    store = RunStore(out)
    df = pd.DataFrame(store.read_patching_rows())
    store.write_csv(store.patching_csv, df)
    return df


def _versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("subroutine-circuits", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _device_name(device: str) -> str:
    """A human-readable device description for the manifest."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def run_base_models(cfg: ExperimentConfig, store: RunStore, prep: Prepared, progress: bool):
    """Plan and execute one job per base model; returns their info dicts."""
    from subroutine_circuits.experiment.executors import make_executor
    from subroutine_circuits.experiment.jobs import plan_study
    from subroutine_circuits.experiment.stages import run_base_model_job

    executor = make_executor(getattr(cfg, "executor", "auto"), cfg.workers)
    jobs = plan_study(cfg, str(store.root), prep.label)
    fn = functools.partial(run_base_model_job, prep=prep)
    return executor.map(fn, jobs, progress=progress, desc="base models")


def write_manifest(
    cfg: ExperimentConfig, store: RunStore, infos: list[dict[str, Any]], timings: dict[str, Any]
) -> None:
    """``manifest.json``: config, versions, device, timings (earlier invocations kept), and
    the base models with their composite accuracy (excluded ones listed)."""
    previous = store.read_manifest()
    manifest = {
        "config": cfg.to_dict(),
        "margin": cfg.margin,
        "chance": cfg.chance,
        "min_composite_acc": cfg.min_composite_acc,
        "versions": _versions(),
        "device": _device_name(resolve_device(cfg.device)),
        "timings": {**timings, "base_models": sorted(infos, key=lambda i: i["base_id"])},
        "excluded_base_models": sorted(i["base_id"] for i in infos if not i["base_ok"]),
        "base_models": {i["base_id"]: i["composite_acc"] for i in infos},
        # exclusion uses the VALIDATION composite accuracy (base_models: test, for reference)
        "base_models_val": {i["base_id"]: i.get("composite_val_acc") for i in infos},
        # per base model: accuracies with every maskable unit ablated, bypass flag and path
        "bypass_check": {i["base_id"]: i.get("bypass_check") for i in infos},
        "bypass_base_models": sorted(
            i["base_id"] for i in infos if (i.get("bypass_check") or {}).get("bypass")
        ),
        # timings of earlier invocations into this folder (a resumed run times only its part)
        "previous_timings": [*previous.get("previous_timings", []),
                             *([previous["timings"]] if "timings" in previous else [])],
    }  # fmt: skip
    store.write_manifest(manifest)


def finish_outputs(cfg: ExperimentConfig, out: str | os.PathLike) -> dict[str, float]:
    """Summary statistics and (if patching is on) ``patching.csv``; returns their timings."""
    from subroutine_circuits.analysis.summary import write_summary

    timings: dict[str, float] = {}
    t = time.time()
    write_summary(out)
    timings["summary_s"] = time.time() - t
    if cfg.patching:
        t = time.time()
        collect_patching(out)
        timings["patching_s"] = time.time() - t
    return timings


def run_experiment(cfg: ExperimentConfig, out_dir: str | os.PathLike, progress: bool = True):
    """Run (or resume) the experiment into ``out_dir``; returns the results DataFrame."""
    from subroutine_circuits.experiment.executors import make_executor

    cfg.validate()
    make_executor(getattr(cfg, "executor", "auto"), cfg.workers)  # an unknown name fails now
    store = RunStore(out_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prep = prepare(cfg)  # once, and before any training: fails fast on bad task / data
    store.check_same_config(cfg.to_dict(), RESUMABLE_FIELDS)
    infos = run_base_models(cfg, store, prep, progress)
    df = collect_results(store.root)
    t_runs = time.time() - t0
    post = finish_outputs(cfg, store.root)
    write_manifest(cfg, store, infos, {"runs_s": t_runs, **post, "total_s": time.time() - t0})
    from subroutine_circuits.report import build_report

    build_report(Path(store.root))
    return df
