"""Run the whole experiment: base models x inits x subroutines x mask seeds, resumably.

Layout of the output folder ``OUT``:

- ``models/<base_id>/``: base-model checkpoints (``<base_id> = <task>__<init>__s<seed>``);
- ``search/<base_id>__<sub>.json``: the mask hyperparameters chosen on validation data;
- ``masks/<base_id>__<sub>__m<mask_seed>.pt``: final masks;
- ``runs/<base_id>__<sub>__m<mask_seed>.json``: one finished results row each (the unit of
  resumption: a rerun skips every run whose file exists and never rewrites it);
- ``results.csv`` (assembled from ``runs/``), ``summary.csv``, ``overlap.csv``,
  ``patching.csv``, ``manifest.json``, ``report.html``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.utils import atomic_write_json, atomic_write_text

RESULT_COLUMNS = [
    "task", "model", "init", "base_seed", "mask_seed", "subroutine", "other", "mask_kind",
    "density", "n_kept", "composite_acc", "base_ok", "full_target_acc", "full_other_acc",
    "full_sub_acc", "sub_target_acc", "sub_other_acc", "sub_sub_acc", "abl_target_acc",
    "abl_other_acc", "ablzero_target_acc", "ablzero_other_acc", "ablmean_target_acc",
    "ablmean_other_acc", "ablreinit_target_acc",
    "ablreinit_other_acc", "randabl_target_acc", "randabl_other_acc", "sub_diff", "abl_diff",
    "randabl_diff", "compositional", "mask_path", "hparams", "val_score",
]  # fmt: skip


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_task(spec: str, rule: dict[str, bool] | None = None):
    """A built-in task by name, or a user task from a .jsonl/.csv file."""
    from subroutine_circuits.tasks import get_task, load_user_task

    if spec.endswith((".jsonl", ".csv", ".json")) or os.path.sep in spec:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"task data file not found: {spec}")
        return load_user_task(spec, rule=rule)
    task = get_task(spec)
    if rule:
        task = task.with_rule(rule) if hasattr(task, "with_rule") else task
    return task


def task_label(cfg: ExperimentConfig, task) -> str:
    """A short, file-name-safe name for the task."""
    name = getattr(task, "name", None) or Path(cfg.task).stem
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


@dataclass
class Prepared:
    """Everything a worker needs that is shared by all base models."""

    task: Any
    tokenizer: Any
    splits: dict[str, dict[str, list]]
    subroutines: list[str]
    label: str


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Build the task, tokenizer and seeded splits."""
    from subroutine_circuits.tasks import make_splits

    task = load_task(cfg.task, cfg.rule)
    subroutines = list(cfg.subroutines or task.predicates)
    unknown = [s for s in subroutines if s not in task.predicates]
    if unknown:
        raise ValueError(
            f"unknown subroutine {unknown[0]!r}; the task's predicates are {list(task.predicates)}"
        )
    if len(task.predicates) < 2:
        raise ValueError("a compositional task needs at least two predicates")
    splits = make_splits(
        task,
        cfg.data.n_train,
        seed=cfg.data.seed,
        rule=cfg.rule,
        split_sizes=(cfg.data.n_train, cfg.data.n_val, cfg.data.n_test),
    )
    for split, kinds in splits.items():
        for kind, probs in kinds.items():
            if not probs:
                raise ValueError(f"the {split} split has no {kind!r} problems")
    tokenizer = task.tokenizer()
    return Prepared(task, tokenizer, splits, subroutines, task_label(cfg, task))


def base_id(label: str, init: str, seed: int) -> str:
    """Folder/file stem of one base model."""
    return f"{label}__{init}__s{seed}"


def _other(subroutines: list[str], predicates, sub: str) -> str:
    """The subroutine whose partition serves as 'other' for ``sub``."""
    rest = [p for p in subroutines if p != sub] or [p for p in predicates if p != sub]
    return rest[0]


def build_base_model(cfg: ExperimentConfig, prep: Prepared, init: str, seed: int, device: str):
    """Create (and pretrain / train as ``init`` says) one base model; returns (model, meta)."""
    import torch

    from subroutine_circuits.models import ModelSpec, TrainConfig, make_model, train_ooo

    t0 = time.time()
    meta: dict[str, Any] = {"init": init, "seed": seed}
    if cfg.model.checkpoint:
        # A user's checkpoint takes the place of self-supervised pretraining: "pretrained"
        # fine-tunes it; "trained" and "random_init" re-initialise the same architecture.
        model, tok, _ = _load_user_checkpoint(cfg.model.checkpoint, device)
        _check_tokenizer(tok, prep.tokenizer, cfg.model.checkpoint)
        if init != "pretrained":
            torch.manual_seed(seed)
            model.init_weights()
            meta["reinitialised_from"] = cfg.model.checkpoint
    else:
        spec = ModelSpec(
            preset=cfg.model.preset,
            attention=cfg.model.attention,
            n_ctx=cfg.model.n_ctx,
            pool=cfg.model.pool,
            overrides=dict(cfg.model.overrides),
        )
        model = make_model(spec, prep.tokenizer.vocab_size, seed=seed, device=device)
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


def run_base_model(
    cfg: ExperimentConfig, out: Path, init: str, seed: int, prep: Prepared | None = None
) -> dict[str, Any]:
    """Everything for one base model: train/load it, then every subroutine x mask seed run.

    Finished runs (their ``runs/*.json`` exist) are skipped. ``prep`` (task, tokenizer, splits)
    is built from ``cfg`` when not given. Returns timing information.
    """
    from subroutine_circuits.experiment.evaluate import ablation_matrix
    from subroutine_circuits.experiment.search import accuracy, encode, search_mask, train_mask
    from subroutine_circuits.masks import save_mask
    from subroutine_circuits.models import load_checkpoint, save_checkpoint

    device = resolve_device(cfg.device)
    prep = prep if prep is not None else prepare(cfg)
    bid = base_id(prep.label, init, seed)
    timings: dict[str, float] = {}
    t0 = time.time()
    model_dir = out / "models" / bid
    if (model_dir / "meta.json").exists():
        model, _, meta = load_checkpoint(model_dir)
        model.to(device)
    else:
        model, meta = build_base_model(cfg, prep, init, seed, device)
    timings["base_model"] = time.time() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pool = cfg.model.pool

    enc = {
        split: {kind: encode(probs, prep.tokenizer, device) for kind, probs in kinds.items()}
        for split, kinds in prep.splits.items()
    }
    test = enc["test"]
    if "composite_acc" not in meta:
        meta["composite_acc"] = accuracy(model, test["composite"], pool)
        meta["full"] = {kind: accuracy(model, data, pool) for kind, data in test.items()}
        save_checkpoint(model_dir, model, prep.tokenizer, meta)
    composite_acc = float(meta["composite_acc"])
    base_ok = init == "random_init" or composite_acc >= cfg.min_composite_acc

    t1 = time.time()
    for sub in prep.subroutines:
        other = _other(prep.subroutines, prep.task.predicates, sub)
        search_path = out / "search" / f"{bid}__{sub}.json"
        reuse = {}
        if search_path.exists():
            chosen = json.loads(search_path.read_text())
        else:
            hp, log, best_mask = search_mask(
                model, enc["train"][f"sub_{sub}"], enc["val"][f"sub_{sub}"], cfg.mask,
                seed=cfg.mask_seeds[0], pool=pool,
            )  # fmt: skip
            chosen = {"hp": hp, "log": log}
            atomic_write_json(search_path, chosen)
            reuse[cfg.mask_seeds[0]] = best_mask  # same hp and seed: the same training
        for mseed in cfg.mask_seeds:
            key = f"{bid}__{sub}__m{mseed}"
            run_path = out / "runs" / f"{key}.json"
            if run_path.exists():
                continue
            mask = reuse.pop(mseed, None)
            if mask is None:
                mask = train_mask(
                    model, enc["train"][f"sub_{sub}"], cfg.mask, chosen["hp"], mseed, pool
                )
            val_score = accuracy(model, enc["val"][f"sub_{sub}"], pool, mask)
            mask_rel = f"masks/{key}.pt"
            save_mask(
                out / mask_rel, mask, model,
                {"subroutine": sub, "base_id": bid, "mask_seed": mseed, "hparams": chosen["hp"]},
            )  # fmt: skip
            row = ablation_matrix(
                model, mask, test, sub, other, pool, seed=mseed,
                reference=enc["train"][f"sub_{sub}"], chance=cfg.chance, margin=cfg.margin,
                ablation=cfg.ablation,
            )  # fmt: skip
            row.update(
                task=prep.label,
                model=cfg.model.preset if not cfg.model.checkpoint else "checkpoint",
                init=init, base_seed=seed, mask_seed=mseed, subroutine=sub, other=other,
                mask_kind=cfg.mask.kind, composite_acc=composite_acc, base_ok=base_ok,
                full_target_acc=meta["full"][f"partition_{sub}"],
                full_other_acc=meta["full"][f"partition_{other}"],
                full_sub_acc=meta["full"][f"sub_{sub}"],
                mask_path=mask_rel, hparams=json.dumps(chosen["hp"], sort_keys=True),
                val_score=val_score,
            )  # fmt: skip
            atomic_write_json(run_path, row)
    timings["masks"] = time.time() - t1
    t2 = time.time()
    from subroutine_circuits.experiment.patch_runs import patch_base_model

    patch_base_model(cfg, out, prep, bid, init, seed, model, meta)
    timings["patching"] = time.time() - t2
    timings["total"] = time.time() - t0
    return {"base_id": bid, "composite_acc": composite_acc, "base_ok": base_ok, **timings}


def collect_results(out: Path):
    """Assemble ``results.csv`` from the finished run files; returns the DataFrame."""
    import pandas as pd

    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    df = pd.DataFrame(rows)
    if len(df):
        cols = [c for c in RESULT_COLUMNS if c in df.columns]
        df = df[cols + [c for c in df.columns if c not in cols]]
        df = df.sort_values(["task", "init", "base_seed", "subroutine", "mask_seed"])
    atomic_write_text(out / "results.csv", df.to_csv(index=False))
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


def _run_job(job) -> dict[str, Any]:
    """Run one job tuple ``(cfg, out, init, seed, prep)`` in this process."""
    cfg, out, init, seed, prep = job
    return run_base_model(cfg, Path(out), init, seed, prep)


def _worker(job) -> dict[str, Any]:
    """Process-pool entry: one base model with one torch thread."""
    import torch

    torch.set_num_threads(1)
    return _run_job(job)


def run_experiment(cfg: ExperimentConfig, out_dir: str | os.PathLike, progress: bool = True):
    """Run (or resume) the experiment into ``out_dir``; returns the results DataFrame."""
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prep = prepare(cfg)  # once, and before any training: fails fast on bad task / data
    _check_same_config(cfg, out)
    jobs = [(cfg, str(out), init, seed, prep) for init in cfg.inits for seed in cfg.base_seeds]
    infos: list[dict[str, Any]] = []
    if cfg.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
            futures = [pool.submit(_worker, job) for job in jobs]
            for fut in tqdm(as_completed(futures), total=len(futures), disable=not progress,
                            desc="base models"):  # fmt: skip
                infos.append(fut.result())
    else:
        for job in tqdm(jobs, disable=not progress, desc="base models"):
            infos.append(_run_job(job))
    df = collect_results(out)
    t_runs = time.time() - t0
    post = finish_outputs(cfg, out, prep)
    previous = {}
    if (out / "manifest.json").exists():
        previous = json.loads((out / "manifest.json").read_text())
    manifest = {
        "config": cfg.to_dict(),
        "margin": cfg.margin,
        "chance": cfg.chance,
        "min_composite_acc": cfg.min_composite_acc,
        "versions": _versions(),
        "device": _device_name(resolve_device(cfg.device)),
        "timings": {"runs_s": t_runs, **post, "total_s": time.time() - t0,
                    "base_models": sorted(infos, key=lambda i: i["base_id"])},
        "excluded_base_models": sorted(i["base_id"] for i in infos if not i["base_ok"]),
        "base_models": {i["base_id"]: i["composite_acc"] for i in infos},
        # timings of earlier invocations into this folder (a resumed run times only its part)
        "previous_timings": [*previous.get("previous_timings", []),
                             *([previous["timings"]] if "timings" in previous else [])],
    }  # fmt: skip
    atomic_write_json(out / "manifest.json", manifest)
    try:
        from subroutine_circuits.report import build_report

        build_report(out)
    except ImportError:  # the report package is optional at this stage
        pass
    return df


# Settings that do not change any result: a folder may be resumed with other values of these.
_RESUMABLE_FIELDS = ("workers", "device", "patching", "patching_inits")


def _check_same_config(cfg: ExperimentConfig, out: Path) -> None:
    """Refuse to resume into a folder written with a different configuration.

    Finished runs are never recomputed, so mixing configurations would silently mix results.
    The first run writes ``config.json``; later runs must match it (except the fields in
    ``_RESUMABLE_FIELDS``).
    """
    path = out / "config.json"
    current = json.loads(json.dumps(cfg.to_dict(), default=str))
    if not path.exists():
        atomic_write_json(path, current)
        return
    saved = json.loads(path.read_text())
    for key in sorted(set(saved) | set(current)):
        if key in _RESUMABLE_FIELDS:
            continue
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"{out} holds results of a different configuration: {key!r} was "
                f"{saved.get(key)!r}, now {current.get(key)!r}; use another --out folder"
            )


def finish_outputs(
    cfg: ExperimentConfig, out: Path, prep: Prepared | None = None
) -> dict[str, float]:
    """Summary statistics and (optionally) patching comparisons; returns their timings."""
    timings: dict[str, float] = {}
    t = time.time()
    try:
        from subroutine_circuits.experiment.stats import write_summary
    except ImportError:
        write_summary = None
    if write_summary is not None:
        write_summary(out)
    timings["summary_s"] = time.time() - t
    if cfg.patching:
        t = time.time()
        from subroutine_circuits.experiment.patch_runs import run_patching_all

        run_patching_all(cfg, out, prep)
        timings["patching_s"] = time.time() - t
    return timings
