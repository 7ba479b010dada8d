"""Config checks of the vision path (``[model] family = "cnn"``), torch-free.

A CNN experiment runs a built-in image task (``inside_contact``, ``number_contact``,
``inside_number``) on a :class:`~subroutine_circuits.models.cnn.HookedCNN` preset:

- ``[model]``: ``family = "cnn"``, ``preset`` one of :data:`CNN_PRESET_NAMES`, ``image_size``
  (default: the task's), ``overrides`` of ``CNNConfig`` fields (:data:`CNN_OVERRIDE_TYPES`);
- ``[train]``: the keys ``models.cnn_train.CNNTrainConfig`` shares with the language trainer
  (:data:`CNN_TRAIN_KEYS`), used alike by the ``trained`` and ``pretrained`` inits;
- ``[simclr]``: SimCLR pretraining of the ``pretrained`` init (``[pretrain]`` is the language
  models' table and must stay empty);
- ``[mask] unit_kinds`` / ``[patching_options] kinds``: ``channel`` and/or ``neuron``;
- ``[data] n_train_composite``: composite training problems (image tasks only; default
  ``n_train``), ``corpus_size``: images for SimCLR, drawn from the training split.

These lists mirror constants of torch-importing modules; ``tests/experiment/test_vision_config``
checks that they agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Unit kinds of a CNN (``adapters.cnn.CNN_UNIT_KINDS``).
CNN_UNIT_KINDS = ("channel", "neuron")
#: ``models.cnn.CNN_PRESETS`` names.
CNN_PRESET_NAMES = ("cpu", "cpu_wide", "resnet50", "wide_resnet50")
#: ``tasks.vision.VISION_TASKS``.
VISION_TASKS = ("inside_contact", "number_contact", "inside_number")
#: ``CNNConfig`` fields a ``[model] overrides`` table of a CNN may set.
CNN_OVERRIDE_TYPES: dict[str, Any] = {
    "stem_channels": int,
    "stem_kernel": int,
    "stem_stride": int,
    "stem_pool": bool,
    "block": str,
    "stage_widths": tuple[int, ...],
    "stage_channels": tuple[int, ...],
    "stage_blocks": tuple[int, ...],
    "stage_strides": tuple[int, ...],
    "d_hidden": int,
    "d_embed": int,
    "norm_eps": float,
}
CNN_OVERRIDES_REFUSED: dict[str, str] = {
    "image_size": "set [model] image_size",
    "in_channels": "the shape-world images are RGB",
    "seed": "base models are seeded by base_seeds",
    "device": "set the top-level device (or --device)",
    "preset": "set [model] preset",
}
#: ``[train]`` keys a CNN's trainer (``CNNTrainConfig``) takes.
CNN_TRAIN_KEYS = (
    "lr", "weight_decay", "batch_size", "max_epochs", "max_steps", "patience", "eval_every",
    "time_limit_s", "target_val_acc", "grad_clip", "warmup_steps", "eval_batch_size",
)  # fmt: skip


def check_cnn_model(
    model: Any,
    path: str,
    coerce: Callable[[Any, Any, str], Any],
    unknown_key: Callable[[str, list[str], str], ValueError],
) -> None:
    """Check a ``[model]`` table with ``family = "cnn"``: preset, overrides (keys and types).

    ``coerce`` / ``unknown_key`` are the config module's type check and unknown-key error (this
    module imports nothing from the package, so that ``config`` can import it)."""
    if model.preset not in CNN_PRESET_NAMES:
        raise ValueError(
            f"{path}.preset must be a CNN preset {list(CNN_PRESET_NAMES)} when family = "
            f'"cnn", got {model.preset!r}'
        )
    if model.checkpoint:
        raise ValueError(f"[{path}] checkpoint: CNN experiments build their models from presets")
    where = f"{path}.overrides"
    for key, value in model.overrides.items():
        if key in CNN_OVERRIDES_REFUSED:
            hint = CNN_OVERRIDES_REFUSED[key]
            raise ValueError(f"key {key!r} is not allowed in [{where}]: {hint}")
        if key not in CNN_OVERRIDE_TYPES:
            raise unknown_key(key, sorted(CNN_OVERRIDE_TYPES), where)
        model.overrides[key] = coerce(value, CNN_OVERRIDE_TYPES[key], f"{where}.{key}")


def check_family(cfg: Any, transformer_kinds: tuple[str, ...] = ("head", "neuron")) -> None:
    """Cross-table consistency of the model family: a CNN runs an image task with CNN units,
    the CNN trainer's keys and ``[simclr]``; a transformer a text task without them."""
    cnn = cfg.model.family == "cnn"
    kinds = {"mask.unit_kinds": cfg.mask.unit_kinds,
             "patching_options.kinds": cfg.patching_options.get("kinds") or ()}  # fmt: skip
    allowed = CNN_UNIT_KINDS if cnn else transformer_kinds
    for where, values in kinds.items():
        bad = [k for k in values if k not in allowed]
        if bad:
            raise ValueError(
                f"{where}: {bad[0]!r} is not a unit kind of a {cfg.model.family} "
                f"(use {list(allowed)})"
            )
    if not cnn:
        if cfg.task in VISION_TASKS:
            raise ValueError(f'task {cfg.task!r} is an image task: set [model] family = "cnn"')
        if len(cfg.simclr):
            raise ValueError('[simclr] is for CNNs ([model] family = "cnn"); use [pretrain]')
        if cfg.data.n_train_composite is not None:
            raise ValueError('data.n_train_composite is for image tasks (family = "cnn")')
        return
    if cfg.task not in VISION_TASKS:
        raise ValueError(
            f"a CNN runs a built-in image task {list(VISION_TASKS)}, got task {cfg.task!r}"
        )
    bad = [k for k in cfg.train if k not in CNN_TRAIN_KEYS]
    if bad:
        raise ValueError(f"train.{bad[0]} is not a setting of the CNN trainer; CNN [train] keys: "
                         f"{list(CNN_TRAIN_KEYS)}")  # fmt: skip
    if len(cfg.pretrain):
        raise ValueError("[pretrain] is for language models; a CNN's pretraining is [simclr]")
    if cfg.ablation == "resample":
        raise ValueError(
            "ablation = 'resample' needs token inputs (it resamples aligned token positions); a "
            "CNN experiment uses 'mean' or 'zero'"
        )
    if cfg.mask.kind == "weight":
        # the ablation matrix's reinit condition draws N(0, init_std); a CNN's kaiming scale
        # differs per layer (CNNAdapter.reinit_values), which evaluate.py does not ask for yet
        raise ValueError('mask.kind = "weight" is not wired for CNN experiments yet; use "unit"')
