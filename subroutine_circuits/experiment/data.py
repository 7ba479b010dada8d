"""The study's data: the task, its tokenizer and the seeded splits shared by every base model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subroutine_circuits.experiment.config import ExperimentConfig


@dataclass
class Prepared:
    """Everything a job needs that is shared by all base models (picklable)."""

    task: Any
    tokenizer: Any
    splits: dict[str, dict[str, list]]
    subroutines: list[str]
    label: str


def task_label(cfg: ExperimentConfig, task: Any) -> str:
    """A short, file-name-safe name for the task."""
    name = getattr(task, "name", None) or Path(cfg.task).stem
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def other_subroutine(subroutines: list[str], predicates: Any, sub: str) -> str:
    """The subroutine whose partition serves as 'other' for ``sub``."""
    rest = [p for p in subroutines if p != sub] or [p for p in predicates if p != sub]
    return rest[0]


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Build the task, tokenizer and seeded splits (fails fast on a bad task or empty split)."""
    if cfg.model.family == "cnn":  # image tasks on CNNs: experiment/vision.py
        from subroutine_circuits.experiment.vision import prepare_vision

        task, splits, subroutines = prepare_vision(cfg)
        return Prepared(task, None, splits, subroutines, task_label(cfg, task))
    from subroutine_circuits.tasks import load_task, make_splits

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
    tokenizer = task_tokenizer(cfg, task)
    return Prepared(task, tokenizer, splits, subroutines, task_label(cfg, task))


def task_tokenizer(cfg: ExperimentConfig, task: Any) -> Any:
    """The tokenizer of every stimulus: a Hugging Face checkpoint folder's own
    (``[model] checkpoint``), else the task's built-in word-level tokenizer."""
    from subroutine_circuits.experiment import hf

    if hf.is_hf_folder(cfg.model.checkpoint):
        return hf.task_tokenizer(cfg.model.checkpoint)
    return task.tokenizer()
