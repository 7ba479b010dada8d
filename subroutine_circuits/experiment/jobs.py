"""Typed jobs of the study: picklable, self-describing, each with a stable key.

A study is planned as one :class:`BaseModelJob` per (init, base seed); running one builds (or
loads) the base model and then runs its :class:`MaskSearchJob` s, :class:`EvaluationJob` s and
:class:`PatchingJob` s in the same process, so the frozen model is loaded once. The sub-jobs
are planned by :func:`plan_base_model` and executed by the pure stage functions of
:mod:`subroutine_circuits.experiment.stages`; their keys name their files in the
:class:`~subroutine_circuits.store.RunStore`. Executors
(:mod:`subroutine_circuits.experiment.executors`) schedule base-model jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.store import base_id, run_key


@dataclass(frozen=True)
class BaseModelJob:
    """Build/train (or load) one base model, then run every job of it.

    Attributes:
        cfg: the experiment configuration.
        store: the experiment folder (a :class:`~subroutine_circuits.store.RunStore` root).
        task: the task's file-name-safe label.
        init: ``trained`` / ``pretrained`` / ``random_init``.
        seed: the base-model seed.
    """

    cfg: ExperimentConfig = field(compare=False, repr=False)
    store: str
    task: str
    init: str
    seed: int

    @property
    def key(self) -> str:
        """``<task>__<init>__s<seed>`` (the base id)."""
        return base_id(self.task, self.init, self.seed)


@dataclass(frozen=True)
class MaskSearchJob:
    """Choose the mask hyperparameters of one subroutine on validation data."""

    base: str  # base id
    subroutine: str
    seed: int  # the mask seed the grid points are trained with

    @property
    def key(self) -> str:
        """``<base_id>__<subroutine>``."""
        return f"{self.base}__{self.subroutine}"


@dataclass(frozen=True)
class EvaluationJob:
    """Train one mask (chosen hyperparameters, one mask seed) and evaluate its ablation matrix."""

    base: str
    subroutine: str
    other: str
    mask_seed: int

    @property
    def key(self) -> str:
        """``<base_id>__<subroutine>__m<mask_seed>`` (the run key)."""
        return run_key(self.base, self.subroutine, self.mask_seed)


@dataclass(frozen=True)
class PatchingJob:
    """Patching circuits of one subroutine of one base model, compared with its first mask."""

    base: str
    subroutine: str
    init: str
    seed: int
    mask_seed: int

    @property
    def key(self) -> str:
        """``<base_id>__<subroutine>``."""
        return f"{self.base}__{self.subroutine}"


@dataclass(frozen=True)
class BasePlan:
    """The sub-jobs of one base model, in execution order per subroutine."""

    searches: tuple[MaskSearchJob, ...]
    evaluations: tuple[EvaluationJob, ...]
    patchings: tuple[PatchingJob, ...]


def plan_study(cfg: ExperimentConfig, store: str, task: str) -> list[BaseModelJob]:
    """One base-model job per (init, base seed), inits outermost."""
    return [
        BaseModelJob(cfg, str(store), task, init, int(seed))
        for init in cfg.inits
        for seed in cfg.base_seeds
    ]


def plan_base_model(job: BaseModelJob, subroutines: list[str], others: dict[str, str]) -> BasePlan:
    """The mask-search, evaluation and patching jobs of one base model."""
    cfg, bid = job.cfg, job.key
    searches = tuple(MaskSearchJob(bid, s, int(cfg.mask_seeds[0])) for s in subroutines)
    evaluations = tuple(
        EvaluationJob(bid, s, others[s], int(m)) for s in subroutines for m in cfg.mask_seeds
    )
    patchings: tuple[PatchingJob, ...] = ()
    if cfg.patching and job.init in cfg.patching_inits:
        patchings = tuple(
            PatchingJob(bid, s, job.init, job.seed, int(cfg.mask_seeds[0])) for s in subroutines
        )
    return BasePlan(searches, evaluations, patchings)
