"""Stage functions of the study: each takes a job (plus the in-memory model and data it needs)
and returns its result; :func:`run_base_model_job` strings them together for one base model and
records every result in the :class:`~subroutine_circuits.store.RunStore` (finished work is
skipped, which is what makes a study resumable).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.experiment.data import Prepared, other_subroutine, prepare
from subroutine_circuits.experiment.jobs import (
    BaseModelJob,
    EvaluationJob,
    MaskSearchJob,
    PatchingJob,
    plan_base_model,
)
from subroutine_circuits.store import RunStore
from subroutine_circuits.utils import resolve_device

# ----------------------------------------------------------------------------- base model


@dataclass
class BaseModel:
    """A frozen base model (through its adapter), its metadata and its encoded splits."""

    adapter: Any
    meta: dict[str, Any]
    enc: dict[str, dict[str, Any]]  # split -> kind -> EncodedProblems
    composite_acc: float
    base_ok: bool


def _load_user_checkpoint(path: str, device: str):
    """A checkpoint written by this library (``save_checkpoint``: has meta.json and vocab)."""
    from subroutine_circuits.models import load_checkpoint

    if (Path(path) / "meta.json").exists():
        model, tok, meta = load_checkpoint(path)
        return model.to(device), tok, meta
    if (Path(path) / "config.json").exists():
        raise ValueError(
            f"{path} looks like a Hugging Face checkpoint; experiments need the task's word-level "
            "tokenizer, so they run on checkpoints saved by this library. Load Hugging Face "
            "models with models.load_hf_checkpoint and use masks/patching on them directly."
        )
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
    if init == "pretrained" and not cfg.model.checkpoint:
        from subroutine_circuits.models import PretrainConfig, pretrain

        corpus = prep.task.corpus(cfg.data.corpus_size, random.Random(10_000 + seed))
        pcfg = PretrainConfig(**{"seed": seed, "device": device, "progress": False, **cfg.pretrain})
        info = pretrain(model, corpus, prep.tokenizer, pcfg)
        meta["pretrain"] = {k: v for k, v in dict(info).items() if not isinstance(v, list)}
    meta["pretrain_seconds"] = time.time() - t0
    if init != "random_init":
        tcfg = TrainConfig(**{"seed": seed, "device": device, "progress": False, **cfg.train})
        res = train_ooo(
            model, prep.splits["train"]["composite"], prep.splits["val"]["composite"],
            prep.tokenizer, tcfg,
        )  # fmt: skip
        meta["best_val_acc"] = float(res.best_val_acc)
    meta["train_seconds"] = time.time() - t0
    return model, meta


def base_model_stage(
    job: BaseModelJob, prep: Prepared, store: RunStore, given: tuple[Any, dict] | None = None
) -> BaseModel:
    """Load the base model of ``job`` from the store, or build, train and save it; freeze it,
    encode the splits and measure its test accuracies (saved with the checkpoint).

    ``given``: ``(model, meta)`` of a base model built elsewhere (e.g. a planted ground-truth
    model, ``experiment.validate``); used instead of building one when the store has none."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.search import encode
    from subroutine_circuits.models import load_checkpoint, save_checkpoint

    cfg = job.cfg
    device = resolve_device(cfg.device)
    model_dir = store.model_dir(job.key)
    if store.has_model(job.key):
        model, _, meta = load_checkpoint(model_dir)
        model.to(device)
    elif given is not None:
        model, meta = given[0].to(device), dict(given[1])
    else:
        model, meta = build_base_model(cfg, prep, job.init, job.seed, device)
    adapter = as_adapter(model, tokenizer=prep.tokenizer, pool=cfg.model.pool).freeze()
    enc = {
        split: {kind: encode(adapter, probs, device) for kind, probs in kinds.items()}
        for split, kinds in prep.splits.items()
    }
    test = enc["test"]
    if "composite_acc" not in meta:
        meta["composite_acc"] = adapter.accuracy(test["composite"])
        meta["full"] = {kind: adapter.accuracy(data) for kind, data in test.items()}
        save_checkpoint(model_dir, model, prep.tokenizer, meta)
    composite_acc = float(meta["composite_acc"])
    base_ok = job.init == "random_init" or composite_acc >= cfg.min_composite_acc
    return BaseModel(adapter, meta, enc, composite_acc, base_ok)


# ----------------------------------------------------------------------------- masks


@dataclass
class SearchResult:
    """The chosen hyperparameters, the log of every grid point, and the mask trained at the
    chosen point with the search's seed (None when the search was loaded from the store)."""

    hp: dict[str, Any]
    log: list[dict[str, Any]]
    mask: Any = None


def mask_search_stage(job: MaskSearchJob, cfg: ExperimentConfig, base: BaseModel) -> SearchResult:
    """Train a mask per grid point on the subroutine's training problems; choose on validation."""
    from subroutine_circuits.experiment.search import search_mask

    kind = f"sub_{job.subroutine}"
    hp, log, mask = search_mask(
        base.adapter, base.enc["train"][kind], base.enc["val"][kind], cfg.mask, seed=job.seed
    )
    return SearchResult(hp, log, mask)


def evaluation_stage(
    job: EvaluationJob,
    cfg: ExperimentConfig,
    base: BaseModel,
    hp: dict[str, Any],
    mask: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Train the mask of ``job`` (unless given) and evaluate its ablation matrix on test data.

    Returns ``(mask, row)``; ``row`` has the ablation-matrix columns and ``val_score``.
    """
    from subroutine_circuits.experiment.evaluate import ablation_matrix
    from subroutine_circuits.experiment.search import train_mask

    kind = f"sub_{job.subroutine}"
    if mask is None:
        mask = train_mask(base.adapter, base.enc["train"][kind], cfg.mask, hp, job.mask_seed)
    val_score = base.adapter.accuracy(base.enc["val"][kind], mask)
    row = ablation_matrix(
        base.adapter, mask, base.enc["test"], job.subroutine, job.other, seed=job.mask_seed,
        reference=base.enc["train"][kind], chance=cfg.chance, margin=cfg.margin,
        ablation=cfg.ablation,
    )  # fmt: skip
    row["val_score"] = val_score
    return mask, row


def _run_row(
    job: EvaluationJob, base_job: BaseModelJob, base: BaseModel, hp: dict, row: dict, rel: str
) -> dict[str, Any]:
    """The results.csv row of one evaluation (columns documented in docs/RESULTS.md)."""
    cfg, meta = base_job.cfg, base.meta
    val_score = row.pop("val_score")
    row.update(
        task=base_job.task,
        model=cfg.model.preset if not cfg.model.checkpoint else "checkpoint",
        init=base_job.init, base_seed=base_job.seed, mask_seed=job.mask_seed,
        subroutine=job.subroutine, other=job.other,
        mask_kind=cfg.mask.kind, composite_acc=base.composite_acc, base_ok=base.base_ok,
        full_target_acc=meta["full"][f"partition_{job.subroutine}"],
        full_other_acc=meta["full"][f"partition_{job.other}"],
        full_sub_acc=meta["full"][f"sub_{job.subroutine}"],
        mask_path=rel, hparams=json.dumps(hp, sort_keys=True),
        val_score=val_score,
    )  # fmt: skip
    return row


def run_subroutine_masks(
    base_job: BaseModelJob,
    base: BaseModel,
    store: RunStore,
    search: MaskSearchJob,
    evaluations: list[EvaluationJob],
) -> None:
    """The search of one subroutine (loaded if stored) and every unfinished evaluation of it."""
    from subroutine_circuits.masks import save_mask

    cfg = base_job.cfg
    chosen = store.read_search(search.base, search.subroutine)
    reuse: dict[int, Any] = {}
    if chosen is None:
        res = mask_search_stage(search, cfg, base)
        chosen = {"hp": res.hp, "log": res.log}
        store.write_search(search.base, search.subroutine, chosen)
        reuse[search.seed] = res.mask  # same hp and seed: the same training
    for ev in evaluations:
        if store.run_done(ev.key):
            continue
        mask, row = evaluation_stage(ev, cfg, base, chosen["hp"], reuse.pop(ev.mask_seed, None))
        rel = store.mask_rel(ev.key)
        save_mask(
            store.mask_path(ev.key), mask, base.adapter,
            {"subroutine": ev.subroutine, "base_id": ev.base, "mask_seed": ev.mask_seed,
             "hparams": chosen["hp"]},
        )  # fmt: skip
        store.write_run(ev.key, _run_row(ev, base_job, base, chosen["hp"], row, rel))


# ----------------------------------------------------------------------------- patching


def patching_stage(
    job: PatchingJob, cfg: ExperimentConfig, prep: Prepared, base: BaseModel, store: RunStore
) -> list[dict[str, Any]]:
    """Patching rows of one subroutine, compared with the stored mask of ``job.mask_seed``."""
    from subroutine_circuits.experiment.patching import PatchingConfig, jsonable, run_patching
    from subroutine_circuits.masks import load_mask

    mask_path = store.mask_path(store.run_key(job.base, job.subroutine, job.mask_seed))
    mask = load_mask(mask_path, base.adapter) if mask_path.exists() else None
    if mask is not None and not hasattr(mask, "unit_map"):
        mask = None  # weight masks: patching works on units, compare without a mask
    pcfg = PatchingConfig(
        **{
            "methods": tuple(cfg.patching_methods),
            "n_pairs": cfg.patching_pairs,
            "seed": job.seed,
            "pool": cfg.model.pool,
            "cross_ablation": cfg.ablation,
            "out_dir": str(store.patching_dir),
            "meta": {"task": prep.label, "init": job.init, "base_seed": job.seed},
            **cfg.patching_options,
        }
    )
    rows = run_patching(
        base.adapter, prep.tokenizer, prep.task, job.subroutine, prep.splits["test"], mask, pcfg
    )
    for r in rows:
        r["composite_acc"] = base.meta.get("composite_acc")
        r["mask_seed"] = job.mask_seed if mask is not None else None
    return jsonable(rows)


# ----------------------------------------------------------------------------- one base model


def run_base_model_job(
    job: BaseModelJob, prep: Prepared | None = None, given: tuple[Any, dict] | None = None
) -> dict[str, Any]:
    """Everything for one base model: train/load it, then every subroutine x mask seed run and
    the patching of each subroutine. Finished work (files in the store) is skipped.

    ``prep`` (task, tokenizer, splits) is built from ``job.cfg`` when not given; ``given`` is an
    injected base model (see :func:`base_model_stage`). Returns timing information and the
    model's composite accuracy.
    """
    prep = prep if prep is not None else prepare(job.cfg)
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
    for search in plan.searches:
        evals = [e for e in plan.evaluations if e.subroutine == search.subroutine]
        run_subroutine_masks(job, base, store, search, evals)
    timings["masks"] = time.time() - t1
    t2 = time.time()
    for pjob in plan.patchings:
        if not store.patching_row_path(pjob.base, pjob.subroutine).exists():
            rows = patching_stage(pjob, job.cfg, prep, base, store)
            store.write_patching_rows(pjob.base, pjob.subroutine, rows)
    timings["patching"] = time.time() - t2
    timings["total"] = time.time() - t0
    return {
        "base_id": job.key,
        "composite_acc": base.composite_acc,
        "base_ok": base.base_ok,
        **timings,
    }
