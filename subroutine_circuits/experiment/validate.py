"""``subroutine-circuits validate``: score the verdict and the circuit methods on planted models.

For every planted kind (``groundtruth.planted.KINDS``) and seed, :func:`validate` builds (or
loads from ``OUT/planted/``) the planted model from the study's own splits, hands it to the
normal study machinery as the base model (``stages.run_base_model_job(..., given=...)``: mask
search, evaluation on test partitions, activation / attribution patching), then scores every
mask and every patching ranking against the planted units and writes:

- ``OUT/groundtruth.csv``: one row per (kind, seed, subroutine, method[, mask seed]) with ROC AUC
  against the planted units, precision / recall of the kept set (patching: the top-k units by
  ``|score|`` at the size of the mask of the first mask seed), the expected verdict and the
  run's verdict (``analysis.inference.run_verdict``; masks only);
- ``OUT/error_rates.json`` and ``OUT/report.html``: verdict error rates (false "compositional"
  on redundant / entangled / random-init models, missed "compositional" on modular ones) and
  the methods' AUCs side by side;
- ``OUT/runs/<kind>/``: an ordinary experiment folder per kind (``results.csv``, masks,
  patching scores), which is what makes a second call resume instead of recompute.

Every ablation (mask training, evaluation, truth checks) is the study's configured one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Success threshold of a mask search when the results row has no ``mask_ok`` column yet.
MASK_MIN_ACC = 0.9
#: Matched random draws of the fallback ``randabl_p`` (smallest attainable p = 1/100).
N_RANDOM = 99
INIT_OF = {"random_init": "random_init"}  # every other kind is a trained model


@dataclass
class ValidateConfig:
    """Settings of :func:`validate` (defaults: the whole run fits in ~10 min on 2 CPU cores).

    seeds: planted-model seeds; kinds: planted kinds (``entangled`` is opt-in: its check
    rejected every draw so far, see ``groundtruth.entangled``, and each rejected draw costs
    minutes); mask_seeds: mask seeds per subroutine;
    task: a built-in two-predicate task; n_train / n_val / n_test / data_seed: the study's
    splits (shared by every planted model); methods: patching methods; patching_pairs: minimal
    pairs per subroutine; planted: ``PlantedConfig`` overrides (default ``compact=False``:
    pruned units stay as all-zero units, so every kind has the architecture of its random-init
    control, and the matched random subnetworks of the verdict have room to differ from the
    learned one: in a compacted model nearly every unit belongs to A or B, so a random draw
    with A's units per layer breaks A too, measured ``randabl_diff`` down to -0.72 for A's
    mask, and no learned mask can beat the null); experiment: ``ExperimentConfig``
    overrides (e.g. ``{"mask": {"steps": 200}}``); workers: processes, one planted model each
    (one torch thread per process: these models are tiny, so threads only contend); progress:
    print one line per model; settings: which analysis settings the planted models are studied
    with, ``"demo"`` (default: the demo's mask search, draws, margin, ablation and thresholds,
    :func:`demo_analysis_settings`, so that the planted error rates hold for what the demo
    reports; issue 22) or ``"defaults"`` (the library's ``ExperimentConfig`` defaults).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    kinds: tuple[str, ...] = ("modular", "redundant", "random_init")
    mask_seeds: tuple[int, ...] = (0, 1)
    task: str = "agreement_singular"
    n_train: int = 400
    n_val: int = 150
    n_test: int = 200
    data_seed: int = 0
    methods: tuple[str, ...] = ("activation", "attribution")
    patching_pairs: int = 32
    planted: dict[str, Any] = field(default_factory=lambda: {"compact": False})
    experiment: dict[str, Any] = field(default_factory=dict)
    workers: int = 2
    progress: bool = True
    settings: str = "demo"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        from subroutine_circuits.groundtruth.planted import KINDS

        if not self.seeds or not self.mask_seeds:
            raise ValueError("validate needs at least one seed and one mask seed")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown planted kind(s) {bad or '(none)'}; choose from {KINDS}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.settings not in SETTINGS:
            raise ValueError(f"settings must be one of {SETTINGS}, got {self.settings!r}")


#: Analysis settings :func:`validate` can study the planted models with.
SETTINGS = ("demo", "defaults")
#: The fields of the demo's config that decide a verdict (everything but the models, data
#: sizes, seeds and execution): what ``validate --settings demo`` takes over.
DEMO_ANALYSIS_FIELDS = (
    "mask", "margin", "chance", "ablation", "mask_min_acc", "min_mask_units", "n_random",
    "random_controls", "bypass_tolerance",
)  # fmt: skip


def demo_analysis_settings() -> dict[str, Any]:
    """The demo's verdict-deciding settings (:data:`DEMO_ANALYSIS_FIELDS` of
    ``experiment.config.demo_config()``) as config-dict entries."""
    from subroutine_circuits.experiment.config import demo_config

    demo = demo_config()
    out: dict[str, Any] = {}
    for name in DEMO_ANALYSIS_FIELDS:
        value = getattr(demo, name)
        out[name] = value.to_dict() if hasattr(value, "to_dict") else value
    return out


def experiment_config(vcfg: ValidateConfig):
    """The ``ExperimentConfig`` the planted models are studied with."""
    from subroutine_circuits.experiment.config import config_from_dict

    d: dict[str, Any] = {
        "task": vcfg.task,
        "inits": ["trained", "random_init"],
        "base_seeds": list(vcfg.seeds),
        "mask_seeds": list(vcfg.mask_seeds),
        "data": {"n_train": vcfg.n_train, "n_val": vcfg.n_val, "n_test": vcfg.n_test,
                 "seed": vcfg.data_seed},
        "patching": bool(vcfg.methods),
        "patching_methods": list(vcfg.methods) or ["activation"],
        "patching_pairs": vcfg.patching_pairs,
        "patching_inits": ["trained"],
        "workers": 1,
    }  # fmt: skip
    if vcfg.settings == "demo":
        d.update(demo_analysis_settings())
    if vcfg.methods:  # the frontier's mask curve is the sparsity path (issue 23's criterion)
        d["mask"] = {**d.get("mask", {}), "frontier_path": True}
    for k, v in vcfg.experiment.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    cfg = config_from_dict(d)
    cfg.validate()
    return cfg


def planted_config(vcfg: ValidateConfig, exp_cfg: Any):
    """The ``PlantedConfig`` (its truth is checked with the study's ablation)."""
    from subroutine_circuits.groundtruth.planted import PlantedConfig

    pcfg = PlantedConfig(**{
        "task": vcfg.task, "ablation": exp_cfg.ablation,
        "sufficient_acc": exp_cfg.mask_min_acc, "minimal_tol": exp_cfg.mask.tolerance,
        **vcfg.planted,
    })  # fmt: skip
    pcfg.validate()
    return pcfg


# ----------------------------------------------------------------------------- planted models


def planted_model(kind: str, seed: int, out: Path, pcfg: Any, prep: Any, key: dict):
    """Load the planted model from ``out/planted/<kind>_s<seed>`` or build, check and save it.

    Returns ``(planted, None)`` or ``(None, reason)`` when it could not be built (an entangled
    or redundant model none of whose draws passed its check)."""
    from subroutine_circuits.groundtruth.entangled import EntangledBuildError
    from subroutine_circuits.groundtruth.planted import (
        RedundantBuildError,
        build_planted,
        load_planted,
        save_planted,
    )
    from subroutine_circuits.groundtruth.truth import truth_check

    directory = out / "planted" / f"{kind}_s{seed}"
    failed = directory / "build_failed.json"
    if failed.is_file() and json.loads(failed.read_text()).get("key") == key:
        return None, json.loads(failed.read_text())["reason"]
    planted = load_planted(directory, prep.task, prep.splits, key)
    if planted is not None:
        return planted, None
    try:
        planted = build_planted(kind, seed, pcfg, splits=prep.splits)
    except (EntangledBuildError, RedundantBuildError) as e:
        directory.mkdir(parents=True, exist_ok=True)
        failed.write_text(json.dumps({"key": key, "reason": str(e)}, default=str))
        return None, str(e)
    planted.metrics["truth_check"] = truth_check(planted, pcfg)
    save_planted(planted, directory, key)
    return planted, None


# ----------------------------------------------------------------------------- runs


def _fallback_randabl_p(base: Any, run: dict, mask: Any, cfg: Any) -> float:
    """``randabl_p`` of a run whose row lacks it: the learned ``abl_diff`` against ``N_RANDOM``
    random subnetworks with as many units per (layer, kind), ablated as ``evaluate.py`` ablates
    the learned one (same ablation, same reference: the subroutine's training problems); ties
    decided exactly over the numbers of test problems of the two partitions."""
    from subroutine_circuits.analysis.inference import randabl_p
    from subroutine_circuits.experiment.batched import evaluate_fixed_masks, matched_random_masks
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.utils import clipped_diff

    um = mask.unit_map
    keep = mask.flat_binary().bool()
    draws = matched_random_masks(um, keep, N_RANDOM, seed=int(run["mask_seed"]) + 10_000)
    template = UnitMask.fixed(um, ~keep, ablation=cfg.ablation)
    values = None
    if cfg.ablation == "mean":
        ref = base.enc["train"][f"sub_{run['subroutine']}"]
        template.set_mean(base.adapter, ref.flat_inputs())
        values = template.ablation_values
    test = base.enc["test"]
    acc = {
        part: evaluate_fixed_masks(base.adapter.model, test[f"partition_{run[part]}"], ~draws,
                                   unit_map=um, ablation_values=values)
        for part in ("subroutine", "other")
    }  # fmt: skip
    diffs = [clipped_diff(float(t), float(o), cfg.chance)
             for t, o in zip(acc["subroutine"], acc["other"])]  # fmt: skip
    n_problems = tuple(len(test[f"partition_{run[part]}"]) for part in ("subroutine", "other"))
    return randabl_p(float(run["abl_diff"]), diffs, n_problems, cfg.chance)


def run_verdict_row(
    run: dict, base: Any, mask: Any, cfg: Any, cache: dict | None = None
) -> dict[str, Any]:
    """The verdict inputs of a results row (filled in when the row predates them; fallback
    p-values are kept in ``cache`` by mask path) and the verdict of
    ``analysis.inference.run_verdict``."""
    from subroutine_circuits.analysis.inference import run_verdict

    cache = {} if cache is None else cache
    out = {k: run.get(k) for k in ("sub_diff", "abl_diff", "val_score", "base_ok")}
    out["mask_ok"] = run.get("mask_ok", float(run["val_score"]) >= MASK_MIN_ACC)
    out["randabl_p"] = run.get("randabl_p")
    if out["randabl_p"] is None:
        if run["mask_path"] not in cache:
            cache[run["mask_path"]] = _fallback_randabl_p(base, run, mask, cfg)
        out["randabl_p"] = cache[run["mask_path"]]
    out["bypass"] = run.get("bypass", False)
    out["verdict"] = run_verdict(out, margin=cfg.margin)
    return out


def score_model(planted: Any, store: Any, job: Any, prep: Any) -> list[dict[str, Any]]:
    """``groundtruth.csv`` rows of one planted model whose study runs are in ``store``."""
    from subroutine_circuits.experiment.stages import base_model_stage
    from subroutine_circuits.groundtruth.scoring import mask_row
    from subroutine_circuits.masks import load_mask
    from subroutine_circuits.utils import atomic_write_json

    cfg = job.cfg
    base = base_model_stage(job, prep, store)
    rows, sizes, needed = [], {}, {}
    cache_path = store.root / f"randabl_fallback_s{job.seed}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    runs = [r for r in store.read_runs() if r.get("base_seed") == job.seed]
    for run in sorted(runs, key=lambda r: (r["subroutine"], r["mask_seed"])):
        mask = load_mask(store.resolve(run["mask_path"]), base.adapter)
        extra = run_verdict_row(run, base, mask, cfg, cache)
        row = mask_row(planted, run["subroutine"], mask, verdict=extra["verdict"])
        row.update(mask_seed=run["mask_seed"], **extra)
        if planted.kind == "modular":
            if run["subroutine"] not in needed:
                needed[run["subroutine"]] = truth_needed(
                    planted, run["subroutine"], base, mask, cfg
                )
            row["n_truth_needed"] = needed[run["subroutine"]]
        rows.append(row)
        if int(run["mask_seed"]) == int(cfg.mask_seeds[0]):
            sizes[run["subroutine"]] = int(mask.flat_binary().sum())
    if cache:
        atomic_write_json(cache_path, cache)
    frontier = [r for r in store.read_frontier_rows() if r.get("base_seed") == job.seed]
    for row in rows:
        row.update(frontier_columns(frontier, row["subroutine"], row["mask_seed"]))
    rows += patching_rows(planted, store, job, sizes)
    for r in rows:
        r["expected"] = planted.expected
    return rows


def truth_needed(planted: Any, subroutine: str, base: Any, mask: Any, cfg: Any) -> float:
    """How many planted units the subroutine needs at the study's success threshold: the
    planted subnetwork (aligned with ``mask``'s units) made 1-minimal by the minimality pass's
    finish on the validation problems, under the study's ablation, with the floor the pass
    gives a mask (its accuracy minus ``mask.tolerance``, at least ``mask_min_acc``; NaN when
    the planted subnetwork alone does not reach ``mask_min_acc``).

    Why: the planted subnetwork is defined on the part's loss (every unit raises it by at least
    ``min_effect``), the chosen mask by accuracy; a mask that keeps only planted units and
    fewer of them is as small as the planted model allows at that threshold, which this count
    says."""
    from subroutine_circuits.experiment.evaluate import fixed_accuracies
    from subroutine_circuits.experiment.search import finish_1_minimal, minimality_floor

    unit_map = mask.unit_map
    truth = planted.truth_vector(subroutine, unit_map).bool()
    val = base.enc["val"][f"sub_{subroutine}"]
    ablator = base.ablator(cfg.ablation)
    acc = float(fixed_accuracies(base.adapter, val, truth[None], unit_map, ablator)[0])
    if acc < cfg.mask_min_acc:
        return float("nan")
    floor = minimality_floor(acc, cfg.mask.tolerance, cfg.mask_min_acc)
    keep, _, _ = finish_1_minimal(base.adapter, val, truth, acc, floor, unit_map, ablator)
    return float(keep.sum())


#: Faithfulness differences below this (1% of the full-vs-empty metric gap) are ties when
#: the frontier compares the mask with patching (fixed before any planted frontier was seen).
FRONTIER_TIE = 0.01
#: The chosen mask's size must lie within this factor of the planted subnetwork (issue 23).
SIZE_FACTOR = 1.5


#: The frontier curve of the mask's sparsity path (``[mask] frontier_path``, which validate
#: turns on). Issue 23's criterion compares the chosen mask's own ranking ("mask", as before
#: the path existed); the path's gaps are reported beside it (``*_path`` columns).
PATH = "mask path"


def _gaps(df: Any, patch: Any, method: str) -> dict[str, float]:
    """The smallest faithfulness and accuracy differences over the frontier's sizes between
    ``method``'s curve and the best patching ranking's, and ``method``'s CPR."""
    mask = df[df["method"] == method].set_index("fraction")
    best = patch.groupby("fraction")[["faithfulness", "accuracy"]].max()
    return {
        "gap": float((mask["faithfulness"] - best["faithfulness"]).min()),
        "gap_acc": float((mask["accuracy"] - best["accuracy"]).min()),
        "cpr": float(mask["cpr"].iloc[0]),
    }


def frontier_columns(frontier: list[dict], subroutine: str, mask_seed: Any) -> dict[str, Any]:
    """The frontier's verdict on one mask run (empty without frontier rows):
    ``frontier_gap`` / ``frontier_gap_acc``, the smallest difference over the frontier's sizes
    between the chosen mask's ranking's faithfulness (accuracy) and the best patching ranking's
    at that size (>= -:data:`FRONTIER_TIE`: at or above patching at every size); ``cpr_mask``
    and ``cpr_patching`` (the best patching method's CPR); with a sparsity path
    (:data:`PATH`) the same for it: ``frontier_gap_path``, ``frontier_gap_acc_path``,
    ``cpr_path``."""
    import pandas as pd

    from subroutine_circuits.experiment.config import PATCHING_METHODS

    df = pd.DataFrame(
        [r for r in frontier if r["subroutine"] == subroutine and r.get("kind") == "curve"
         and r.get("mask_seed") == mask_seed]
    )  # fmt: skip
    if df.empty or "mask" not in set(df["method"]):
        return {}
    patch = df[df["method"].isin(PATCHING_METHODS)]
    if patch.empty:
        return {}
    g = _gaps(df, patch, "mask")
    out = {
        "frontier_gap": g["gap"],
        "frontier_gap_acc": g["gap_acc"],
        "cpr_mask": g["cpr"],
        "cpr_patching": float(patch.groupby("method")["cpr"].first().max()),
    }
    if PATH in set(df["method"]):
        g = _gaps(df, patch, PATH)
        out.update(frontier_gap_path=g["gap"], frontier_gap_acc_path=g["gap_acc"],
                   cpr_path=g["cpr"])  # fmt: skip
    return out


def frontier_summary(df: Any) -> dict[str, Any]:
    """Issue 23's planted-model criteria over the modular models' mask runs: ``n`` runs with
    a frontier, ``size_within`` (chosen mask within :data:`SIZE_FACTOR` of the planted
    subnetwork, either way), ``size_within_needed`` (the same against the planted subnetwork
    made 1-minimal at the success threshold, ``n_truth_needed``), ``at_or_above``
    (faithfulness at or above every patching ranking at every size, ties within
    :data:`FRONTIER_TIE`), ``at_or_above_acc`` (the same for accuracy), the median size ratios
    and worst gaps, and the same frontier counts for the sparsity path (``path_*``) when it
    was trained."""
    if "frontier_gap" not in df.columns:
        return {"n": 0}
    m = df[(df["method"] == "mask") & (df["model_kind"] == "modular")]
    m = m[m["frontier_gap"].notna()]
    if m.empty:
        return {"n": 0}

    def within(denominator: str) -> tuple[Any, Any]:
        ratio = m["n_kept"].astype(float) / m[denominator].astype(float)
        return ratio, (ratio <= SIZE_FACTOR) & (ratio >= 1 / SIZE_FACTOR)

    ratio, ok = within("n_truth")
    out = {
        "n": int(len(m)),
        "size_within": int(ok.sum()),
        "size_ratio_median": float(ratio.median()),
        "size_ratio_min": float(ratio.min()),
        "size_ratio_max": float(ratio.max()),
        "at_or_above": int((m["frontier_gap"] >= -FRONTIER_TIE).sum()),
        "at_or_above_acc": int((m["frontier_gap_acc"] >= -FRONTIER_TIE).sum()),
        "worst_gap": float(m["frontier_gap"].min()),
        "worst_gap_acc": float(m["frontier_gap_acc"].min()),
        "cpr_mask_median": float(m["cpr_mask"].median()),
        "cpr_patching_median": float(m["cpr_patching"].median()),
    }
    if "n_truth_needed" in m.columns and m["n_truth_needed"].notna().all():
        ratio, ok = within("n_truth_needed")
        out.update(
            size_within_needed=int(ok.sum()),
            needed_ratio_median=float(ratio.median()),
            needed_ratio_min=float(ratio.min()),
            needed_ratio_max=float(ratio.max()),
        )
    if "frontier_gap_path" in m.columns and m["frontier_gap_path"].notna().all():
        out.update(
            path_at_or_above=int((m["frontier_gap_path"] >= -FRONTIER_TIE).sum()),
            path_at_or_above_acc=int((m["frontier_gap_acc_path"] >= -FRONTIER_TIE).sum()),
            path_worst_gap=float(m["frontier_gap_path"].min()),
            path_worst_gap_acc=float(m["frontier_gap_acc_path"].min()),
            cpr_path_median=float(m["cpr_path"].median()),
        )
    return out


def patching_rows(planted: Any, store: Any, job: Any, sizes: dict[str, int]) -> list[dict]:
    """Rows of the patching methods: ROC AUC of ``|score|``, precision / recall of the top-k
    units at the size of the subroutine's first mask."""
    import torch

    from subroutine_circuits.groundtruth.scoring import groundtruth_row, top_k_kept

    rows = []
    for prow in store.read_patching_rows():
        if prow.get("base_seed") != job.seed or not prow.get("scores_file"):
            continue
        saved = torch.load(store.patching_dir / prow["scores_file"], weights_only=False)
        scores = torch.as_tensor(saved["scores"]).abs()
        k = sizes.get(prow["subroutine"])
        kept = None if k is None else top_k_kept(scores, k)
        units = [tuple(u) for u in saved["units"]]
        rows.append(groundtruth_row(planted, prow["subroutine"], prow["method"], scores,
                                    kept=kept, units=units))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- driver


def validate_model(
    kind: str, seed: int, out: Path, cfg: Any, pcfg: Any, prep: Any, key: dict
) -> tuple[list[dict], dict]:
    """Build/load one planted model, run the study on it (resumable), return its rows."""
    from subroutine_circuits.experiment.jobs import BaseModelJob
    from subroutine_circuits.experiment.runner import RESUMABLE_FIELDS, collect_results
    from subroutine_circuits.experiment.stages import run_base_model_job
    from subroutine_circuits.groundtruth.planted import EXPECTED, _jsonable
    from subroutine_circuits.store import RunStore

    t0 = time.perf_counter()
    planted, reason = planted_model(kind, seed, out, pcfg, prep, key)
    if planted is None:
        return [{"model_kind": kind, "seed": seed, "method": "build", "expected": EXPECTED[kind],
                 "verdict": "not built", "note": reason[:500]}], {}  # fmt: skip
    built = time.perf_counter() - t0
    store = RunStore(out / "runs" / kind)
    store.root.mkdir(parents=True, exist_ok=True)
    # more seeds later is a resumption (each seed is its own base model)
    store.check_same_config({**cfg.to_dict(), "planted": key}, (*RESUMABLE_FIELDS, "base_seeds"))
    job = BaseModelJob(cfg, str(store.root), prep.label, INIT_OF.get(kind, "trained"), seed)
    meta = {"init": job.init, "seed": seed, "planted": _jsonable(planted.summary())}
    run_base_model_job(job, prep, given=(planted.model, meta))
    collect_results(store.root, cfg.margin)
    rows = score_model(planted, store, job, prep)
    timing = {"build_s": built, "study_s": time.perf_counter() - t0 - built}
    return rows, {"summary": _jsonable(planted.summary()), **timing}


def validate(out: str | Path, seeds: Any = None, cfg: ValidateConfig | None = None) -> Any:
    """Planted models -> the normal study -> ``groundtruth.csv``, error rates, ``report.html``.

    ``out``: the output folder (a second call resumes: planted models, masks and patching
    scores already there are loaded, not recomputed); ``seeds`` overrides ``cfg.seeds``.
    Returns the ``groundtruth.csv`` DataFrame.
    """

    from subroutine_circuits.experiment.data import prepare
    from subroutine_circuits.experiment.executors import ProcessPoolExecutor
    from subroutine_circuits.utils import atomic_write_json, atomic_write_text

    cfg = cfg if cfg is not None else ValidateConfig()
    if seeds is not None:
        cfg = ValidateConfig(**{**asdict(cfg), "seeds": tuple(int(s) for s in seeds)})
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    exp_cfg = experiment_config(cfg)
    pcfg = planted_config(cfg, exp_cfg)
    prep = prepare(exp_cfg)
    key = {"planted": pcfg.to_dict(), "data": exp_cfg.data.to_dict(), "task": cfg.task}
    rows: list[dict] = []
    models: dict[str, Any] = {}
    jobs = [(kind, seed) for kind in cfg.kinds for seed in cfg.seeds]
    fn = functools.partial(_validate_job, out=out, cfg=exp_cfg, pcfg=pcfg, prep=prep, key=key,
                           progress=cfg.progress)  # fmt: skip
    with _one_thread():
        results = ProcessPoolExecutor(cfg.workers, threads=1).map(fn, jobs)
    for (kind, seed), (r, info) in zip(jobs, results):
        rows += r
        models[f"{kind}_s{seed}"] = info
    df = groundtruth_frame(rows)
    atomic_write_text(out / "groundtruth.csv", df.to_csv(index=False))
    rates = error_rates_frame(df)
    timings = {"total_s": time.perf_counter() - t0}
    atomic_write_json(
        out / "error_rates.json",
        {"rates": rates, "models": models, "timings": timings, "config": asdict(cfg)},
    )
    atomic_write_text(out / "report.html", report_page(df, rates, models, out))
    return df


def _validate_job(job: tuple[str, int], **kw: Any):
    """Worker entry (picklable): one planted model, with a progress line."""
    progress = kw.pop("progress")
    rows, info = validate_model(job[0], job[1], **kw)
    if progress:
        print(f"validate: {job[0]} seed {job[1]}: {_progress_line(rows, info)}", flush=True)
    return rows, info


@contextlib.contextmanager
def _one_thread():
    """One torch thread in this process for the block (in-process runs of tiny models)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _progress_line(rows: list[dict], info: dict) -> str:
    masks = [r for r in rows if r.get("method") == "mask"]
    if not masks:
        return str(rows[0].get("verdict")) if rows else "no rows"
    aucs = [r["roc_auc"] for r in masks if not _nan(r["roc_auc"])]
    verdicts = ", ".join(sorted({str(r["verdict"]) for r in masks}))
    auc = f"mask AUC {min(aucs):.3f}-{max(aucs):.3f}" if aucs else "no AUC"
    return (
        f"{auc}; verdicts {verdicts} ({info.get('build_s', 0):.0f}s build, "
        f"{info.get('study_s', 0):.0f}s study)"
    )


def _nan(x: Any) -> bool:
    try:
        return x is None or math.isnan(float(x))
    except (TypeError, ValueError):
        return True


#: Columns of groundtruth.csv (the scoring columns first, then the verdict's inputs).
COLUMNS = ("model_kind", "seed", "subroutine", "method", "mask_seed", "roc_auc", "precision",
           "recall", "n_units", "n_truth", "n_kept", "expected", "verdict", "sub_diff",
           "abl_diff", "randabl_p", "mask_ok", "val_score", "base_ok", "note")  # fmt: skip


def groundtruth_frame(rows: list[dict]) -> Any:
    """Rows as a DataFrame with :data:`COLUMNS` first."""
    import pandas as pd

    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]]


def error_rates_frame(df: Any) -> dict[str, Any]:
    """Verdict error rates over the usable mask runs, and the methods' mean AUCs per kind."""
    from subroutine_circuits.groundtruth.scoring import error_rates

    masks = df[df["method"] == "mask"].to_dict("records")
    rates = error_rates(masks)
    aucs = (
        df[df["method"] != "build"].groupby(["model_kind", "method"])["roc_auc"]
        .agg(["mean", "min", "count"]).reset_index()
    )  # fmt: skip
    rates["auc"] = json.loads(aucs.to_json(orient="records"))
    rates["frontier"] = frontier_summary(df)
    return rates


# ----------------------------------------------------------------------------- report


def section_groundtruth(df: Any, rates: dict[str, Any]) -> str:
    """HTML section: verdict error rates, per-kind verdict counts, AUCs of every method."""
    import pandas as pd

    from subroutine_circuits.groundtruth.scoring import all_runs_text
    from subroutine_circuits.report.html import _esc, _note, _table

    def pct(x: Any) -> str:
        return "n/a" if _nan(x) else f"{100 * float(x):.0f}%"

    head = (
        "<p><b>False 'compositional'</b> on non-compositional models (redundant, entangled, "
        f"random-init): "
        f"{pct(rates['false_compositional'])} of {rates['n_non_compositional']} usable runs. "
        f"<b>Missed 'compositional'</b> on modular models: {pct(rates['missed_compositional'])}"
        f" of {rates['n_modular']} usable runs.</p>"
        + "<p>Runs called compositional out of <i>all</i> runs (failed searches included): "
        + _esc(all_runs_text(rates))
        + ".</p>"
    )
    kinds = pd.DataFrame([{"kind": k, **v} for k, v in rates["per_kind"].items()])
    masks = df[df["method"] == "mask"]
    counts = masks.groupby(["model_kind", "verdict"]).size().unstack(fill_value=0).reset_index()
    scored = df[df["method"].isin(["mask", "activation", "attribution", "integrated_gradients"])]
    auc = scored.pivot_table(index=["model_kind", "subroutine"], columns="method",
                             values="roc_auc", aggfunc="mean").reset_index()  # fmt: skip
    pr = scored.pivot_table(index=["model_kind", "method"], values=["precision", "recall"],
                            aggfunc="mean").reset_index()  # fmt: skip
    red = masks[masks["model_kind"] == "redundant"]
    copies = pd.DataFrame()
    if len(red) and "copies_touched" in red:
        red = red.assign(copies_touched=red["copies_touched"].astype("Int64"))
        copies = red.groupby(["copies_touched", "verdict"]).size().unstack(fill_value=0)
        copies = copies.reset_index().rename_axis(columns=None)
    counts.columns.name = auc.columns.name = None  # no empty "verdict" / "method" column
    failed = df[df["method"] == "build"]
    notes = "".join(_note(f"{r.model_kind} seed {r.seed} not built: {_esc(str(r.note))[:300]}")
                    for r in failed.itertuples())  # fmt: skip
    return (
        head
        + "<h3>Usable runs per kind (error = share with a verdict other than expected)</h3>"
        + (_table(kinds) if len(kinds) else _note("no usable runs"))
        + "<h3>Verdicts of every mask run</h3>"
        + (_table(counts) if len(counts) else "")
        + (
            "<h3>Redundant models: verdicts by the copies of its subroutine a mask touches</h3>"
            + _note(
                "1: the mask lies in one copy, whose removal leaves the other copy to "
                "solve the partition; 2: it spans both copies"
            )
            + _table(copies)
            if len(copies)
            else ""
        )  # fmt: skip
        + "<h3>ROC AUC against the planted units (mean over seeds and mask seeds)</h3>"
        + (_table(auc) if len(auc) else _note("no model with a unit-level truth"))
        + "<h3>Precision / recall of the kept set (patching: top-k at the mask's size)</h3>"
        + (_table(pr) if len(pr) else "")
        + _frontier_text(rates.get("frontier", {}))
        + notes
    )


def frontier_sentence(fr: dict[str, Any]) -> str:
    """The modular models' frontier criteria (:func:`frontier_summary`) in one sentence
    (empty without frontiers); the report and the command line print it."""
    if not fr.get("n"):
        return ""
    return (
        f"Of {fr['n']} mask runs on modular models, {fr['size_within']} chose a mask within "
        f"{SIZE_FACTOR}x of the planted subnetwork's size (ratio median "
        f"{fr['size_ratio_median']:.2f}, {fr['size_ratio_min']:.2f}-{fr['size_ratio_max']:.2f});"
        f" the mask ranking's faithfulness is at or above every patching ranking's at every "
        f"size in {fr['at_or_above']} (ties within {FRONTIER_TIE}; worst gap "
        f"{fr['worst_gap']:.3f}), its subroutine accuracy in {fr['at_or_above_acc']} (worst gap "
        f"{fr['worst_gap_acc']:.3f}); median CPR mask {fr['cpr_mask_median']:.3f}, best "
        f"patching {fr['cpr_patching_median']:.3f}." + _needed_text(fr) + _path_text(fr)
    )


def _needed_text(fr: dict[str, Any]) -> str:
    """The size criterion against the planted subnetwork made 1-minimal (empty without)."""
    if "size_within_needed" not in fr:
        return ""
    return (
        f" Against the planted subnetwork made 1-minimal at the success threshold (the "
        f"minimality pass's finish run on the planted units): {fr['size_within_needed']} "
        f"within {SIZE_FACTOR}x (ratio median {fr['needed_ratio_median']:.2f}, "
        f"{fr['needed_ratio_min']:.2f}-{fr['needed_ratio_max']:.2f})."
    )


def _path_text(fr: dict[str, Any]) -> str:
    """The sparsity path's frontier counts (empty without a path)."""
    if "path_at_or_above" not in fr:
        return ""
    return (
        f" The mask path (one mask trained per size): faithfulness at or above patching at "
        f"every size in {fr['path_at_or_above']} (worst gap {fr['path_worst_gap']:.3f}), "
        f"accuracy in {fr['path_at_or_above_acc']} (worst gap {fr['path_worst_gap_acc']:.3f}); "
        f"median CPR {fr['cpr_path_median']:.3f}."
    )


def _frontier_text(fr: dict[str, Any]) -> str:
    """:func:`frontier_sentence` as a report paragraph (empty without frontiers)."""
    from subroutine_circuits.report.html import _esc

    text = frontier_sentence(fr)
    return f"<h3>Frontier (issue 23)</h3><p>{_esc(text)}</p>" if text else ""


def report_page(df: Any, rates: dict[str, Any], models: dict[str, Any], out: Path) -> str:
    """The standalone ``report.html`` of a validation folder."""
    from subroutine_circuits.report.html import _CSS, _esc, _section

    problems: list[str] = []
    sections = [
        ("Ground truth: verdict error rates and circuit recovery", "groundtruth",
         lambda: section_groundtruth(df, rates)),
        ("Planted models", "planted", lambda: _planted_table(models)),
    ]  # fmt: skip
    body = "".join(_section(t, a, b, problems) for t, a, b in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Ground-truth validation: {_esc(out.name)}</title><style>{_CSS}</style>"
        f"</head><body><h1>Ground-truth validation</h1><p>{_esc(out.resolve())}</p>"
        f"{body}</body></html>\n"
    )


def _minimal_drop(check: dict[str, Any]) -> float | None:
    """The largest partition drop over a redundancy check's minimal subnetworks (``None``
    when a subroutine was not enumerated or the check predates them)."""
    minimal = check.get("minimal")
    if not minimal or not all(m.get("checked") for m in minimal.values()):
        return None
    return round(max(m["max_drop"] for m in minimal.values()), 3)


def _planted_table(models: dict[str, Any]) -> str:
    import pandas as pd

    from subroutine_circuits.report.html import _table

    rows = []
    for name, info in models.items():
        s = info.get("summary") or {}
        joined = (s.get("metrics") or {}).get("joined") or {}
        check = (s.get("metrics") or {}).get("truth_check") or {}
        red = (s.get("metrics") or {}).get("redundancy_check") or {}
        rows.append({
            "model": name, "units": s.get("n_units"),
            "truth sizes": json.dumps(s.get("truth_sizes")),
            "composite acc (val)": joined.get("full_composite"),
            "all units ablated": joined.get("none_composite"),
            "truth holds": json.dumps({k: v.get("ok") for k, v in check.items()}),
            "one copy ablated: largest partition drop": json.dumps(
                {k: round(v["max_drop"], 3) for k, v in red.items()}) if red else "",
            "minimal subnetworks ablated: largest partition drop": json.dumps(
                {k: _minimal_drop(v) for k, v in red.items()}) if red else "",
            "draws of the parts": len((s.get("metrics") or {}).get("attempts") or []) or "",
            "model built in s": s.get("seconds"),
            # a resumed call loads what is stored: its own seconds, not the first call's
            "this call: build/load s": info.get("build_s"),
            "this call: study s": info.get("study_s"),
        })  # fmt: skip
    return _table(pd.DataFrame(rows))


def cmd_validate(args: Any) -> int:
    """CLI: ``subroutine-circuits validate --out DIR [--seeds ...] [--kinds ...]
    [--workers N]``."""
    from subroutine_circuits.groundtruth.scoring import all_runs_text

    over: dict[str, Any] = {}
    if args.kinds:
        over["kinds"] = tuple(args.kinds)
    if args.workers is not None:
        over["workers"] = args.workers
    if getattr(args, "settings", None):
        over["settings"] = args.settings
    cfg = ValidateConfig(**{**asdict(ValidateConfig()), **over})
    df = validate(args.out, seeds=args.seeds, cfg=cfg)
    rates = error_rates_frame(df)
    print(
        f"false 'compositional' on non-compositional models: {rates['false_compositional']:.2f}"
        f" (n={rates['n_non_compositional']}); missed on modular: "
        f"{rates['missed_compositional']:.2f} (n={rates['n_modular']})"
    )
    print(f"runs called compositional of all runs: {all_runs_text(rates)}")
    if frontier_sentence(rates.get("frontier", {})):
        print(frontier_sentence(rates["frontier"]))
    print(f"wrote {Path(args.out) / 'groundtruth.csv'} and {Path(args.out) / 'report.html'}")
    return 0
