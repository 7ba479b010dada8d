"""Run the whole study: base models x inits x subroutines x mask seeds, resumably.

``run_experiment(cfg, out_dir)`` validates the configuration, prepares each task and its splits
once, plans one :class:`~subroutine_circuits.experiment.jobs.BaseModelJob` per (task, init,
base seed), runs them all with one executor (in-process, worker processes or Dask), then
assembles ``results.csv`` and ``patching.csv``, the summary statistics, the manifest and the
report. The folder layout belongs to :class:`~subroutine_circuits.store.RunStore`.

The manifest records every invocation into the folder (a resumed sweep is several): its wall
time and per-stage times, the executor and its workers, and the sums (``timings_total``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.experiment.data import Prepared, prepare
from subroutine_circuits.store import RunStore
from subroutine_circuits.utils import resolve_device

#: Column order of results.csv (each column is documented in docs/RESULTS.md).
RESULT_COLUMNS = [
    "task", "model", "init", "base_seed", "mask_seed", "subroutine", "other", "mask_kind",
    "verdict", "compositional", "margins_ok", "paper_compositional", "base_ok", "bypass",
    "mask_ok", "mask_val_ok", "mask_test_ok", "residual_path", "mask_val_acc", "mask_steps",
    "mask_best_step", "mask_stopped_early", "mask_budget_limited", "mask_block_removable",
    "mask_final_temp", "ablation",
    "density", "n_kept", "density_head", "density_neuron", "n_kept_head", "n_kept_neuron",
    "composite_acc", "composite_val_acc", "full_target_acc", "full_other_acc",
    "full_sub_acc", "sub_target_acc", "sub_other_acc", "sub_sub_acc", "abl_target_acc",
    "abl_other_acc", "ablzero_target_acc", "ablzero_other_acc", "ablmean_target_acc",
    "ablmean_other_acc", "ablresample_target_acc", "ablresample_other_acc",
    "ablreinit_target_acc", "ablreinit_other_acc", "randabl_target_acc", "randabl_other_acc",
    "sub_diff", "abl_diff", "sub_diff_lo", "sub_diff_hi", "abl_diff_lo", "abl_diff_hi",
    "ablzero_diff", "ablmean_diff", "ablresample_diff", "ablreinit_diff",
    "randabl_diff", "randabl_diff_mean", "randabl_p", "randabl_n_distinct", "n_random",
    "randabl_stopped", "randabl_n_screened",
    "mask_path", "hparams", "val_score",
]  # fmt: skip

# Settings that do not change any result: a folder may be resumed with other values of these.
RESUMABLE_FIELDS = (
    "workers", "device", "patching", "patching_inits", "executor", "scheduler", "dask_workers",
    "threads", "gpu_memory_gb",
)  # fmt: skip


def collect_results(out: str | os.PathLike, margin: float | None = None):
    """Assemble ``results.csv`` from the finished run files; returns the DataFrame.

    With ``margin`` (the study's), the verdict columns (``verdict``, ``compositional``,
    ``margins_ok``, ``paper_compositional``) are recomputed from each row's inputs with
    :func:`~subroutine_circuits.analysis.inference.verdict_columns`, so that run files written
    by an older version (another verdict order, no ``margins_ok``) agree with this one's.
    """
    import pandas as pd

    store = RunStore(out)
    df = pd.DataFrame(store.read_runs())
    if len(df) and margin is not None:
        from subroutine_circuits.analysis.inference import verdict_columns

        cols = [verdict_columns(r, margin=margin) for r in df.to_dict("records")]
        for c, values in pd.DataFrame(cols, index=df.index).items():
            df[c] = values
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


#: frontier.csv's first columns (then every other column in the order the rows give them).
FRONTIER_COLUMNS = (
    "task", "init", "base_seed", "mask_seed", "subroutine", "method", "kind", "fraction", "k",
    "n_units", "faithfulness", "accuracy", "cpr", "cmd", "n_orders",
)  # fmt: skip


def collect_frontier(out: str | os.PathLike):
    """Assemble ``frontier.csv`` from the frontier rows (none: no file); returns the
    DataFrame."""
    import pandas as pd

    store = RunStore(out)
    df = pd.DataFrame(store.read_frontier_rows())
    if df.empty:
        return df
    cols = [c for c in FRONTIER_COLUMNS if c in df.columns]
    df = df[cols + [c for c in df.columns if c not in cols]]
    store.write_csv(store.frontier_csv, df)
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


@dataclass
class StudyJobRunner:
    """The function executors map over base-model jobs: runs one with its task's data.

    Picklable (shipped once to each Dask worker); ``preps`` maps a task label to its
    :class:`~subroutine_circuits.experiment.data.Prepared` task, tokenizer and splits.
    """

    preps: dict[str, Prepared]

    def __call__(self, job) -> dict[str, Any]:
        from subroutine_circuits.experiment.stages import run_base_model_job

        return run_base_model_job(job, self.preps[job.task])


def prepare_tasks(cfg: ExperimentConfig) -> dict[str, tuple[ExperimentConfig, Prepared]]:
    """Task label -> (the config of that task, its prepared data), for every task of ``cfg``
    (all prepared before any training, so a bad task fails fast)."""
    out: dict[str, tuple[ExperimentConfig, Prepared]] = {}
    for name in cfg.task_names():
        cfg_t = cfg.for_task(name)
        prep = prepare(cfg_t)
        if prep.label in out:
            raise ValueError(f"two tasks of the config have the same label {prep.label!r}")
        out[prep.label] = (cfg_t, prep)
    return out


#: Expected relative cost of a base-model job by init (pretraining + training > training >
#: none): jobs start longest first, so that no long job starts last on a multi-worker cluster.
INIT_COST = {"pretrained": 2, "trained": 1, "random_init": 0}


def balance_order(jobs: list) -> list:
    """The jobs, longest expected first (stable within an init)."""
    return sorted(jobs, key=lambda j: -INIT_COST.get(j.init, 1))


def make_study_executor(cfg: ExperimentConfig):
    """The executor ``cfg`` asks for (``executor``, ``workers``, ``dask_workers``,
    ``scheduler``)."""
    from subroutine_circuits.experiment.executors import make_executor

    return make_executor(cfg.executor, cfg.workers, cfg.dask_workers, cfg.scheduler)


def plan_jobs(cfg: ExperimentConfig, store: RunStore, tasks: dict) -> list:
    """One base-model job per (task, init, base seed), longest expected first."""
    from subroutine_circuits.experiment.jobs import plan_study

    jobs = [j for label, (c, _) in tasks.items() for j in plan_study(c, str(store.root), label)]
    return balance_order(jobs)


def run_base_models(
    cfg: ExperimentConfig,
    store: RunStore,
    tasks: dict[str, tuple[ExperimentConfig, Prepared]],
    progress: bool,
    executor: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Execute every base-model job with ``executor`` (default: the configured one); returns
    their info dicts and the executor's description (where the jobs ran)."""
    executor = executor if executor is not None else make_study_executor(cfg)
    if not progress:  # no progress bar (a batch job's log): one line per finished base model
        executor.log = _log_line
        executor.describe_result = describe_job_result
    fn = StudyJobRunner({label: prep for label, (_, prep) in tasks.items()})
    infos = executor.map(fn, plan_jobs(cfg, store, tasks), progress=progress, desc="base models")
    return infos, describe_executor(executor)


def _log_line(line: str) -> None:
    """Print one progress line to stderr at once (batch logs are read while the job runs)."""
    print(line, file=sys.stderr, flush=True)


def describe_job_result(info: dict[str, Any]) -> str:
    """One line about a finished base-model job: its id, its validation composite accuracy and
    its seconds per part (base model, masks, patching)."""
    acc = info.get("composite_val_acc")
    parts = " ".join(
        f"{k} {float(info[k]):.0f} s" for k in ("base_model", "masks", "patching", "total")
        if k in info
    )  # fmt: skip
    acc_s = f"val composite {acc:.3f}" if isinstance(acc, (int, float)) else "val composite ?"
    peak = info.get("peak_gpu_memory_gb")
    if isinstance(peak, (int, float)):
        parts += f"; peak GPU memory {peak:.2f} GiB"
    return f"{info.get('base_id', '?')} ({acc_s}; {parts})"


def describe_executor(executor: Any) -> dict[str, Any]:
    """The executor's description plus its per-worker table over the jobs finished so far."""
    done = sorted(executor.finished)
    infos = [executor.finished[i] for i in done]
    placements = [executor.placements[i] for i in done]
    return {**executor.describe(), "per_worker": worker_table(placements, infos)}


def worker_table(placements: list[dict[str, str]], infos: list[dict[str, Any]]) -> dict:
    """Per worker: the device its jobs ran on (as the jobs report it), the device's name, the
    number of jobs, their summed seconds (the load balance of the sweep) and the largest peak
    GPU memory of its jobs in GiB (``peak_gpu_memory_gb``; None on the CPU)."""
    per: dict[str, dict[str, Any]] = {}
    for where, info in zip(placements, infos):
        device = str(info.get("device", where.get("device", "?")))
        name = where.get("device_name", device) if device.startswith("cuda") else device
        new = {"device": device, "device_name": name, "jobs": 0, "busy_s": 0.0,
               "peak_gpu_memory_gb": None}  # fmt: skip
        entry = per.setdefault(where.get("worker", "?"), new)
        entry["jobs"] += 1
        entry["busy_s"] += float(info.get("total", 0.0))
        peak = info.get("peak_gpu_memory_gb")
        if peak is not None:
            entry["peak_gpu_memory_gb"] = max(float(peak), entry["peak_gpu_memory_gb"] or 0.0)
    return per


def write_manifest(
    cfg: ExperimentConfig,
    store: RunStore,
    infos: list[dict[str, Any]],
    timings: dict[str, Any],
    executor: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
) -> None:
    """``manifest.json``: config, versions, device, executor and workers, this invocation's
    timings, every invocation's timings (``invocations``) and their sums (``timings_total``),
    the base models with their composite accuracy (excluded ones listed), and each base-model
    job's peak GPU memory (``peak_gpu_memory_gb``, also in its ``timings.base_models`` record;
    None on the CPU).

    ``timings`` holds ``wall_s`` and ``<stage>_s`` (stage seconds summed over jobs);
    ``previous`` is the manifest as it was before this invocation (default: read it now).
    """
    from subroutine_circuits.experiment.timing import accumulate

    previous = store.read_manifest() if previous is None else previous
    invocation = {**timings, "executor": (executor or {}).get("name"),
                  "workers": (executor or {}).get("workers"),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(
                      time.time() - float(timings.get("wall_s", 0.0))))}  # fmt: skip
    manifest = {
        "config": cfg.to_dict(),
        "margin": cfg.margin,
        "chance": cfg.chance,
        "min_composite_acc": cfg.min_composite_acc,
        "versions": _versions(),
        "device": _device_name(resolve_device(cfg.device)),
        "executor": executor or {},
        "timings": {**timings, "base_models": sorted(infos, key=lambda i: i["base_id"])},
        "invocations": [*previous.get("invocations", []), invocation],
        "timings_total": accumulate(previous.get("timings_total", {}), timings),
        "excluded_base_models": sorted(i["base_id"] for i in infos if not i["base_ok"]),
        "base_models": {i["base_id"]: i["composite_acc"] for i in infos},
        # exclusion uses the VALIDATION composite accuracy (base_models: test, for reference)
        "base_models_val": {i["base_id"]: i.get("composite_val_acc") for i in infos},
        # per base model: the job's peak GPU memory in GiB (max_memory_allocated; None on CPU)
        "peak_gpu_memory_gb": {i["base_id"]: i.get("peak_gpu_memory_gb") for i in infos},
        # per base model: accuracies with every maskable unit ablated, bypass flag and path
        "bypass_check": {i["base_id"]: i.get("bypass_check") for i in infos},
        "bypass_base_models": sorted(
            i["base_id"] for i in infos if (i.get("bypass_check") or {}).get("bypass")
        ),
    }
    store.write_manifest(manifest)


def finish_outputs(cfg: ExperimentConfig, out: str | os.PathLike) -> dict[str, float]:
    """Summary statistics and (if patching is on) ``patching.csv`` and ``frontier.csv``;
    returns their timings."""
    from subroutine_circuits.analysis.summary import write_summary

    timings: dict[str, float] = {}
    t = time.time()
    write_summary(out)
    timings["summary_s"] = time.time() - t
    if cfg.patching:
        t = time.time()
        collect_patching(out)
        collect_frontier(out)
        timings["summary_s"] += time.time() - t
    return timings


def run_experiment(cfg: ExperimentConfig, out_dir: str | os.PathLike, progress: bool = True):
    """Run (or resume) the experiment into ``out_dir``; returns the results DataFrame."""
    from subroutine_circuits.experiment.timing import sum_stage_times
    from subroutine_circuits.report import build_report

    cfg.validate()
    store = RunStore(out_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tasks = prepare_tasks(cfg)  # once, and before any training: fails fast on bad task / data
    store.check_same_config(cfg.to_dict(), RESUMABLE_FIELDS)
    t_prep = time.time() - t0
    previous = store.read_manifest()  # earlier invocations' timings
    executor = make_study_executor(cfg)
    try:
        with _sigterm_as_interrupt():
            infos, described = run_base_models(cfg, store, tasks, progress, executor)
    except KeyboardInterrupt:  # Ctrl-C or a time limit: record the part that ran, then stop
        _record_interrupted(cfg, store, executor, previous, t0, t_prep)
        raise
    t_runs = time.time() - t0 - t_prep
    df = collect_results(store.root, cfg.margin)
    stages = sum_stage_times([i.get("stage_times", {}) for i in infos])
    stages["summary_s"] += finish_outputs(cfg, store.root)["summary_s"]
    timings = {"prepare_s": t_prep, "runs_s": t_runs, **stages}
    write_manifest(cfg, store, infos, {**timings, "wall_s": time.time() - t0}, described, previous)
    t = time.time()
    build_report(Path(store.root))  # reads the manifest
    timings["report_s"] = time.time() - t
    # again, with the report's time and the final wall time of this invocation
    write_manifest(cfg, store, infos, {**timings, "wall_s": time.time() - t0}, described, previous)
    return df


@contextmanager
def _sigterm_as_interrupt():
    """Within the block, SIGTERM (e.g. from ``timeout``) raises KeyboardInterrupt like Ctrl-C
    does, so that an invocation stopped by a time limit still records its timings."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _record_interrupted(cfg, store, executor, previous, t0: float, t_prep: float) -> None:
    """Manifest entry of an interrupted invocation: its wall time and the stage times of the
    jobs that finished (``interrupted: true``; the job in flight is redone on resumption)."""
    from subroutine_circuits.experiment.timing import sum_stage_times

    infos = [executor.finished[i] for i in sorted(executor.finished)]
    stages = sum_stage_times([i.get("stage_times", {}) for i in infos])
    timings = {"prepare_s": t_prep, "runs_s": time.time() - t0 - t_prep, **stages,
               "wall_s": time.time() - t0, "interrupted": True}  # fmt: skip
    write_manifest(cfg, store, infos, timings, describe_executor(executor), previous)
