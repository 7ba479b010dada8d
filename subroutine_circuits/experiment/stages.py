"""Stage functions of the study: each takes a job (plus the in-memory model and data it needs)
and returns its result; :func:`run_base_model_job` strings them together for one base model and
records every result in the :class:`~subroutine_circuits.store.RunStore` (finished work is
skipped, which is what makes a study resumable).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subroutine_circuits.experiment import hf
from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.experiment.data import Prepared, other_subroutine, prepare
from subroutine_circuits.experiment.jobs import BaseModelJob, PatchingJob, plan_base_model
from subroutine_circuits.experiment.timing import collect_stage_times, timed_stage
from subroutine_circuits.experiment.verdicts import run_masks_stage
from subroutine_circuits.store import RunStore

# ----------------------------------------------------------------------------- base model


@dataclass
class BaseModel:
    """A frozen base model (through its adapter), its metadata and its encoded splits.

    ``base_ok`` compares the VALIDATION composite accuracy with ``min_composite_acc``
    (random-init models are controls: always ok); ``bypass`` is the bypass check's flag
    (``meta["bypass_check"]``, see ``experiment.verdicts``); ``ablators`` the reference
    ablations (by kind) from the training composite problems.
    """

    adapter: Any
    meta: dict[str, Any]
    enc: dict[str, dict[str, Any]]  # split -> kind -> EncodedProblems
    composite_acc: float
    base_ok: bool
    val_composite_acc: float = float("nan")
    bypass: bool = False
    ablators: dict[str, Any] = field(default_factory=dict)

    def ablator(self, kind: str) -> Any:
        """The study's ablator of ``kind`` (zero ablation needs no reference: a fresh one)."""
        from subroutine_circuits.masks.ablator import Ablator

        return self.ablators.get(kind, Ablator("zero"))


def _load_user_checkpoint(path: str, device: str):
    """A checkpoint written by this library (``save_checkpoint``: has meta.json and vocab)."""
    from subroutine_circuits.models import load_checkpoint

    if (Path(path) / "meta.json").exists():
        model, tok, meta = load_checkpoint(path)
        return model.to(device), tok, meta
    # (Hugging Face folders are dispatched to experiment.hf by _initial_model)
    raise FileNotFoundError(f"model checkpoint folder not found or incomplete: {path}")


def _check_tokenizer(tok, task_tok, path: str) -> None:
    """The checkpoint's vocabulary must encode the task's words to the same ids."""
    if tok is None:
        raise ValueError(f"checkpoint {path} has no vocabulary (vocab.json)")
    missing = [w for w in task_tok.itos if tok.stoi.get(w) != task_tok.stoi[w]]
    if missing:
        raise ValueError(
            f"checkpoint {path} has a different vocabulary from the task: {len(missing)} words "
            f"differ (e.g. {missing[:5]})"
        )


def _initial_model(cfg: ExperimentConfig, prep: Prepared, init: str, seed: int, device: str):
    """The untrained model: a preset built with ``seed``, or the user's checkpoint (kept for
    ``pretrained``, re-initialised for the other inits)."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.models import ModelSpec, make_model

    meta: dict[str, Any] = {"init": init, "seed": seed}
    if hf.is_hf_folder(cfg.model.checkpoint):
        return hf.initial_model(cfg, init, seed, device)
    if cfg.model.checkpoint:
        # A user's checkpoint takes the place of self-supervised pretraining: "pretrained"
        # fine-tunes it; "trained" and "random_init" re-initialise the same architecture.
        model, tok, _ = _load_user_checkpoint(cfg.model.checkpoint, device)
        _check_tokenizer(tok, prep.tokenizer, cfg.model.checkpoint)
        if init != "pretrained":
            as_adapter(model).reinit(seed)
            meta["reinitialised_from"] = cfg.model.checkpoint
        return model, meta
    spec = ModelSpec(
        preset=cfg.model.preset,
        attention=cfg.model.attention,
        n_ctx=cfg.model.n_ctx,
        pool=cfg.model.pool,
        overrides=dict(cfg.model.overrides),
    )
    return make_model(spec, prep.tokenizer.vocab_size, seed=seed, device=device), meta


def build_base_model(cfg: ExperimentConfig, prep: Prepared, init: str, seed: int, device: str):
    """Create (and pretrain / train as ``init`` says) one base model; returns (model, meta)."""
    from subroutine_circuits.models import TrainConfig, train_ooo

    t0 = time.time()
    model, meta = _initial_model(cfg, prep, init, seed, device)
    # float64 (ModelConfig.train_dtype): trained in float64, studied in float32. The pretrained
    # weights are also rounded to float32 before the fine-tuning: the kernels of two machines
    # leave the float64 pretraining about 1e-14 apart, and the first steps of fine-tuning
    # amplify that (measured: 1e-11 after 50 steps, 4e-4 in the loss after 75, then other
    # base models), while rounding to float32 makes the two start the fine-tuning from the
    # same weights (unless a weight lies within 1e-14 of a rounding boundary)
    precise = cfg.model.train_dtype != "float32" and init != "random_init"
    if precise:
        model = _with_dtype(model, cfg.model.train_dtype)
        meta["train_dtype"] = cfg.model.train_dtype
    if init == "pretrained" and not cfg.model.checkpoint:
        from subroutine_circuits.models import PretrainConfig, pretrain

        corpus = prep.task.corpus(cfg.data.corpus_size, random.Random(10_000 + seed))
        pcfg = PretrainConfig(**{"seed": seed, "device": device, "progress": False, **cfg.pretrain})
        info = pretrain(model, corpus, prep.tokenizer, pcfg)
        meta["pretrain"] = {k: v for k, v in dict(info).items() if not isinstance(v, list)}
        if precise:  # snap to the float32 grid between the stages (see above)
            model = _with_dtype(_with_dtype(model, "float32"), cfg.model.train_dtype)
    meta["pretrain_seconds"] = time.time() - t0
    if init != "random_init" and hf.is_hf_folder(cfg.model.checkpoint):
        meta.update(hf.train_base(model, cfg, prep, seed, device))
    elif init != "random_init":
        tcfg = TrainConfig(**{"seed": seed, "device": device, "progress": False, **cfg.train})
        res = train_ooo(
            model, prep.splits["train"]["composite"], prep.splits["val"]["composite"],
            prep.tokenizer, tcfg,
        )  # fmt: skip
        meta["best_val_acc"] = float(res.best_val_acc)
    if precise:
        model = _with_dtype(model, "float32")
    meta["train_seconds"] = time.time() - t0
    return model, meta


def _with_dtype(model, name: str):
    """``model`` with its parameters and floating buffers cast to the torch dtype ``name`` (one
    of ``config.TRAIN_DTYPES``, checked when the config is) and ``cfg.dtype`` kept in step
    (TransformerLens reads it when it builds tensors)."""
    import torch

    dtype = getattr(torch, name)
    model = model.to(dtype)
    if getattr(model, "cfg", None) is not None and hasattr(model.cfg, "dtype"):
        model.cfg.dtype = dtype
    return model


@timed_stage("base_model")
def base_model_stage(
    job: BaseModelJob, prep: Prepared, store: RunStore, given: tuple[Any, dict] | None = None
) -> BaseModel:
    """Load the base model of ``job`` from the store, or build, train and save it; freeze it,
    encode the splits and measure its test accuracies (saved with the checkpoint).

    ``given``: ``(model, meta)`` of a base model built elsewhere (e.g. a planted ground-truth
    model, ``experiment.validate``); used instead of building one when the store has none."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.dask_executor import worker_device
    from subroutine_circuits.experiment.search import encode
    from subroutine_circuits.experiment.verdicts import (
        bypass_check,
        bypass_setting,
        reference_ablators,
    )
    from subroutine_circuits.models import load_checkpoint, save_checkpoint

    cfg = job.cfg
    device = worker_device(cfg.device)  # "auto": the device of the worker running the job
    model_dir = store.model_dir(job.key)
    if cfg.model.family == "cnn":  # image tasks on CNNs: experiment/vision.py
        from subroutine_circuits.experiment.vision import cnn_load_or_build

        model, meta, adapter, save = cnn_load_or_build(job, prep, store, device)
    else:
        if store.has_model(job.key) and hf.is_stored_base(model_dir):
            model, _, meta = hf.load_base(model_dir, device)
        elif store.has_model(job.key):
            model, _, meta = load_checkpoint(model_dir)
            model.to(device)
        elif given is not None:  # built elsewhere (a planted ground-truth model)
            model, meta = given[0].to(device), dict(given[1])
        else:
            model, meta = build_base_model(cfg, prep, job.init, job.seed, device)
        adapter = as_adapter(model, tokenizer=prep.tokenizer, pool=cfg.model.pool).freeze()

        def save(meta: dict[str, Any]) -> None:
            if hf.is_hf_folder(cfg.model.checkpoint):
                hf.save_base(model_dir, model, meta)
            else:
                save_checkpoint(model_dir, model, prep.tokenizer, meta)

    enc = {
        split: {kind: encode(adapter, probs, device) for kind, probs in kinds.items()}
        for split, kinds in prep.splits.items()
    }
    test = enc["test"]
    ablators = {}
    if cfg.mask.kind == "unit":
        ablators = reference_ablators(adapter, cfg, enc["train"]["composite"], seed=job.seed)
    stale = bypass_setting(cfg) != {
        k: meta.get("bypass_check", {}).get(k) for k in bypass_setting(cfg)
    }
    if "composite_val_acc" not in meta or stale:
        meta["composite_acc"] = adapter.accuracy(test["composite"])
        meta["composite_val_acc"] = adapter.accuracy(enc["val"]["composite"])
        meta["full"] = {kind: adapter.accuracy(data) for kind, data in test.items()}
        meta["bypass_check"] = bypass_check(
            adapter, cfg, enc["val"], prep.subroutines, ablators.get(cfg.ablation)
        )
        save(meta)
    val_acc = float(meta["composite_val_acc"])
    base_ok = job.init == "random_init" or val_acc >= cfg.min_composite_acc  # never test data
    return BaseModel(adapter, meta, enc, float(meta["composite_acc"]), base_ok, val_acc,
                     bool(meta["bypass_check"]["bypass"]), ablators)  # fmt: skip


# ----------------------------------------------------------------------------- masks
# The mask search, evaluation and verdict of a base model live in experiment.verdicts
# (run_masks_stage); experiment.search and experiment.evaluate hold their pieces.


# ----------------------------------------------------------------------------- patching


@timed_stage("patching")
def patching_stage(
    job: PatchingJob, cfg: ExperimentConfig, prep: Prepared, base: BaseModel, store: RunStore
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Patching rows of one subroutine, compared with the stored mask of ``job.mask_seed``,
    and the subroutine's frontier rows (``frontier.csv``)."""
    from subroutine_circuits.experiment.patching import (
        PatchingConfig,
        jsonable,
        patching_and_frontier,
    )
    from subroutine_circuits.masks import load_mask

    mask_path = store.mask_path(store.run_key(job.base, job.subroutine, job.mask_seed))
    mask = load_mask(mask_path, base.adapter) if mask_path.exists() else None
    if mask is not None and not hasattr(mask, "unit_map"):
        mask = None  # weight masks: patching works on units, compare without a mask
    meta = {"task": prep.label, "init": job.init, "base_seed": job.seed}
    if mask is not None:
        meta["mask_seed"] = job.mask_seed
    pcfg = PatchingConfig(
        **{
            "methods": tuple(cfg.patching_methods),
            "n_pairs": cfg.patching_pairs,
            "seed": job.seed,
            "pool": cfg.model.pool,
            "kinds": tuple(cfg.mask.unit_kinds),
            "cross_ablation": cfg.ablation,
            # scoring pairs from the validation, faithfulness pairs from the test split of the
            # study's splits (PatchingConfig.score_split / split)
            "split_seed": cfg.data.seed,
            "out_dir": str(store.patching_dir),
            "circuits_dir": str(store.circuits_dir),
            "meta": meta,
            **cfg.patching_options,
        }
    )
    # cross-ablation means: the mask experiment's reference set (training composite problems),
    # as the mask experiment's own ablator when it has the same kind and position awareness
    reference = base.enc["train"]["composite"]
    if pcfg.position_aware and pcfg.cross_ablation in base.ablators:
        reference = base.ablators[pcfg.cross_ablation]
    families, ranking = {}, None
    if mask is not None and pcfg.frontier:
        ranking = mask_ranking(job, cfg, base, pcfg, mask)
        if cfg.mask.frontier_path:
            families["mask path"] = _mask_path(job, cfg, base, store, pcfg, mask)
    rows, frontier = patching_and_frontier(
        base.adapter, prep.tokenizer, prep.task, job.subroutine, prep.splits["test"], mask, pcfg,
        reference=reference, families=families, mask_ranking=ranking,
    )  # fmt: skip

    for r in rows + frontier:
        r["mask_seed"] = job.mask_seed if mask is not None else None
    for r in rows:
        r["composite_acc"] = base.meta.get("composite_acc")
    return jsonable(rows), jsonable(frontier)


def mask_ranking(
    job: PatchingJob, cfg: ExperimentConfig, base: BaseModel, pcfg: Any, mask: Any
) -> list[int] | None:
    """The frontier's ranking of a 1-minimal mask's units, most important first: its kept
    units in reverse order of the minimality pass's backward elimination, then the units a
    forward selection adds on the minimality pass's ranking problems (the first
    :data:`~subroutine_circuits.experiment.search.PRUNE_RANK_PROBLEMS` validation problems;
    :func:`~subroutine_circuits.experiment.search.addition_order`) up to the largest frontier
    size within :data:`~subroutine_circuits.experiment.search.PRUNE_FINISH_MAX_UNITS`; None
    (the ranking stored with the mask) when the pass did not make the mask 1-minimal."""
    from subroutine_circuits.experiment.patching import (
        mask_importance,
        mask_unit_params,
        pruned_info,
    )
    from subroutine_circuits.experiment.search import (
        PRUNE_FINISH_MAX_UNITS,
        addition_order,
        ranking_problems,
    )
    from subroutine_circuits.patching.frontier import sizes_of

    if not pruned_info(mask).get("elimination"):
        return None
    keep = mask.flat_binary().bool().cpu()
    sizes = sizes_of(pcfg.frontier_fractions, keep.numel())
    top = max([k for k in sizes if k <= PRUNE_FINISH_MAX_UNITS], default=0)
    added = []
    if top > int(keep.sum()):
        added = addition_order(
            base.adapter, ranking_problems(base.enc["val"][f"sub_{job.subroutine}"]), keep,
            mask.unit_map, base.ablator(cfg.ablation), mask_unit_params(mask), top,
        )  # fmt: skip
    return mask_importance(mask) + added


def _mask_path(
    job: PatchingJob, cfg: ExperimentConfig, base: BaseModel, store: RunStore, pcfg: Any, mask: Any
) -> Any:
    """The mask path of ``job``'s subroutine at the frontier's sizes
    (:func:`~subroutine_circuits.experiment.search.path_keeps`, at the chosen grid point,
    seeded by the job's mask seed); its log joins the subroutine's ``search/`` file as
    ``path``."""
    from subroutine_circuits.experiment.search import path_keeps
    from subroutine_circuits.patching.frontier import sizes_of

    sub = job.subroutine
    chosen = store.read_search(job.base, sub) or {}
    n = int(mask.flat_binary().numel())
    keep, log = path_keeps(
        base.adapter, base.enc["train"][f"sub_{sub}"], base.enc["val"][f"sub_{sub}"], cfg.mask,
        dict(chosen.get("hp") or {}), int(job.mask_seed), sizes_of(pcfg.frontier_fractions, n),
        base.ablator(cfg.ablation), cfg.mask.engine,
    )  # fmt: skip
    store.write_search(job.base, sub, {**chosen, "path": log})
    short = [e for e in log if not e["feasible"]]
    if short:
        import warnings

        warnings.warn(
            f"{job.base} {sub}: the mask path did not reach sizes "
            f"{[e['k'] for e in short]} within the mask budget (kept "
            f"{[e['kept'] for e in short]} units); their frontier circuits are those masks' "
            "top units by logit (raise [mask] target_lr or the budget)",
            stacklevel=2,
        )
    return keep


# ----------------------------------------------------------------------------- one base model


def run_base_model_job(
    job: BaseModelJob, prep: Prepared | None = None, given: tuple[Any, dict] | None = None
) -> dict[str, Any]:
    """Everything for one base model: train/load it, then every subroutine x mask seed run and
    the patching of each subroutine. Finished work (files in the store) is skipped.

    ``prep`` (task, tokenizer, splits) is built from ``job.cfg`` when not given; ``given`` is an
    injected base model (see :func:`base_model_stage`). Returns timing information, the
    model's composite accuracy and the job's peak GPU memory (``peak_gpu_memory_gb``, None on
    the CPU). The job runs with ``job.cfg.threads`` torch threads (restored afterwards), within
    the worker's GPU memory budget (:func:`subroutine_circuits.memory.job_memory`: chunk sizes,
    the allocator's cache emptied after the job), and TransformerLens attention on the CPU
    uses the faster softmax of :mod:`subroutine_circuits.models.cpu_kernels` throughout.
    """
    from subroutine_circuits.experiment.dask_executor import worker_device
    from subroutine_circuits.memory import job_memory
    from subroutine_circuits.models.cpu_kernels import fast_cpu_attention
    from subroutine_circuits.utils import torch_threads

    with (
        torch_threads(job.cfg.threads),
        collect_stage_times() as stage_times,
        fast_cpu_attention(),
        job_memory(worker_device(job.cfg.device), job.cfg.gpu_memory_gb) as memory,
    ):
        info = _run_base_model(job, prep if prep is not None else prepare(job.cfg), given)
    return {**info, **memory, "stage_times": dict(stage_times)}


def _run_base_model(
    job: BaseModelJob, prep: Prepared, given: tuple[Any, dict] | None = None
) -> dict[str, Any]:
    """The body of :func:`run_base_model_job` (its stage times are collected by the caller)."""
    store = RunStore(job.store)
    timings: dict[str, float] = {}
    t0 = time.time()
    base = base_model_stage(job, prep, store, given)
    timings["base_model"] = time.time() - t0
    others = {
        s: other_subroutine(prep.subroutines, prep.task.predicates, s) for s in prep.subroutines
    }
    plan = plan_base_model(job, prep.subroutines, others)
    t1 = time.time()
    run_masks_stage(job, base, store, plan.searches, plan.evaluations)
    timings["masks"] = time.time() - t1
    t2 = time.time()
    for pjob in plan.patchings:
        if not store.patching_row_path(pjob.base, pjob.subroutine).exists():
            rows, frontier = patching_stage(pjob, job.cfg, prep, base, store)
            store.write_frontier_rows(pjob.base, pjob.subroutine, frontier)
            store.write_patching_rows(pjob.base, pjob.subroutine, rows)
    timings["patching"] = time.time() - t2
    timings["total"] = time.time() - t0
    return {
        "base_id": job.key,
        "composite_acc": base.composite_acc,
        "composite_val_acc": base.val_composite_acc,
        "base_ok": base.base_ok,
        "bypass_check": base.meta["bypass_check"],
        "device": str(base.adapter.device),
        **timings,
    }
