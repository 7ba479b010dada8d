"""Experiment configuration: one dataclass tree, loadable from TOML, with defaults that work."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

INITS = ("trained", "pretrained", "random_init")


@dataclass
class DataConfig:
    """How many odd-one-out problems of each kind to build per split."""

    n_train: int = 600
    n_val: int = 150
    n_test: int = 160
    seed: int = 0
    corpus_size: int = 6000


@dataclass
class ModelConfig:
    """Which base model to build (see ``models.ModelSpec``)."""

    preset: str = "tiny"
    attention: str = "causal"
    pool: str = "last"
    n_ctx: int = 32
    overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # a local checkpoint folder (ours or Hugging Face) instead


@dataclass
class MaskSearchConfig:
    """Mask training and the small hyperparameter grid chosen on validation data."""

    kind: str = "unit"  # "unit" (heads + neurons) or "weight"
    parametrization: str = "hard_concrete"
    unit_kinds: tuple[str, ...] = ("head", "neuron")
    steps: int = 100
    batch_size: int = 16
    # Each grid point overrides these defaults; the chosen point maximises validation accuracy on
    # the subroutine's own problems, ties (within ``tolerance``) broken by the smaller density.
    lr: float = 0.15
    init: float = 2.0
    l0_weight: float = 1.0
    layers: list[int] | None = None
    grid: list[dict[str, Any]] = field(
        default_factory=lambda: [{"l0_weight": 0.5}, {"l0_weight": 2.0}],
    )
    tolerance: float = 0.02


@dataclass
class ExperimentConfig:
    """The whole structural-compositionality experiment."""

    task: str = "agreement_singular"  # a built-in task name or a .jsonl / .csv data file
    rule: dict[str, bool] | None = None
    subroutines: list[str] | None = None  # default: the task's predicates
    inits: list[str] = field(default_factory=lambda: list(INITS))
    base_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mask_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    pretrain: dict[str, Any] = field(default_factory=dict)  # PretrainConfig overrides
    mask: MaskSearchConfig = field(default_factory=MaskSearchConfig)
    margin: float = 0.05
    chance: float = 0.25
    # Which ablation decides abl_diff and the verdict: "mean" (default) or "zero". Zero ablation
    # removes a unit's average contribution as well as its information; on our models it drove
    # accuracies far below chance (0.03 on a 4-way task) while equal-size random subnetworks
    # stayed near 1.0, i.e. it measures an off-distribution shift, not the loss of a subroutine.
    # Both are always reported (ablzero_*, ablmean_* columns).
    ablation: str = "mean"
    min_composite_acc: float = 0.9
    patching: bool = True
    patching_methods: list[str] = field(default_factory=lambda: ["activation", "attribution"])
    patching_pairs: int = 24
    patching_inits: list[str] = field(default_factory=lambda: ["trained", "pretrained"])
    # extra PatchingConfig fields; the default skips the accuracy-vs-size curve of the patching
    # circuit (the matched-size cross-ablation is always run), e.g. [0.05, 0.1] to add points
    patching_options: dict[str, Any] = field(
        default_factory=lambda: {"ablation_curve_fractions": []}
    )
    workers: int = 1
    device: str = "auto"
    # how base-model jobs run: "auto" (worker processes when workers > 1, else in-process),
    # "inprocess" or "processes" (see experiment.executors)
    executor: str = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        bad = [i for i in [*self.inits, *self.patching_inits] if i not in INITS]
        if bad:
            raise ValueError(f"unknown init {bad[0]!r}; choose from {list(INITS)}")
        if not self.base_seeds or not self.mask_seeds:
            raise ValueError("base_seeds and mask_seeds must each list at least one seed")
        if self.mask.kind not in ("unit", "weight"):
            raise ValueError(f"mask.kind must be 'unit' or 'weight', got {self.mask.kind!r}")
        if self.ablation not in ("zero", "mean"):
            raise ValueError(f"ablation must be 'zero' or 'mean', got {self.ablation!r}")
        if not 0 <= self.margin < 0.75:
            raise ValueError(f"margin must be in [0, 0.75), got {self.margin}")
        if self.data.n_train < 1 or self.data.n_val < 1 or self.data.n_test < 1:
            raise ValueError("data.n_train, data.n_val and data.n_test must be positive")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (for the manifest)."""
        return dataclasses.asdict(self)


def _build(cls, data: dict[str, Any], where: str):
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys by name."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in [{where}]; known keys: {sorted(known)}")
    kwargs = {}
    for k, v in data.items():
        sub = {"data": DataConfig, "model": ModelConfig, "mask": MaskSearchConfig}.get(k)
        if cls is ExperimentConfig and sub is not None:
            if not isinstance(v, dict):
                raise ValueError(f"[{k}] must be a table")
            v = _build(sub, v, k)
        if k == "unit_kinds":
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a (TOML-shaped) dict."""
    cfg = _build(ExperimentConfig, dict(data), "top level")
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> ExperimentConfig:
    """Read a TOML experiment config; relative data-file paths resolve against the TOML's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from e
    cfg = config_from_dict(data)
    for attr in ("task",):
        value = getattr(cfg, attr)
        if value.endswith((".jsonl", ".csv", ".json")) and not Path(value).is_absolute():
            candidate = (path.parent / value).resolve()
            if candidate.exists():
                setattr(cfg, attr, str(candidate))
    return cfg


def demo_config() -> ExperimentConfig:
    """The README's main job: tiny models, all three inits, 3 x 3 seeds, full controls.

    Base models run in parallel worker processes (one per CPU core, at most 4), each with one
    torch thread: for tiny models that is much faster than one process with several threads.
    """
    import os

    cfg = ExperimentConfig(workers=max(1, min(4, os.cpu_count() or 1)))
    cfg.validate()
    return cfg
