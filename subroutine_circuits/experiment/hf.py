"""Base models from a local Hugging Face checkpoint folder (``[model] checkpoint = "<folder>"``).

A folder written by ``save_pretrained`` (config, weights and the tokenizer files) becomes the
base model of every init, on TransformerLens 3.9 (GPT-2 -> ``HookedTransformer``, BERT ->
``HookedEncoder``) and 4.x (a ``TransformerBridge`` for any architecture it supports):

- ``pretrained``: the checkpoint's weights, fine-tuned on the composite task;
- ``trained``: the same architecture re-initialised with the model's own (Hugging Face)
  initialiser (seeded by the base seed), then trained on the composite task;
- ``random_init``: re-initialised the same way, not trained.

Every stimulus is encoded with the folder's own tokenizer (:class:`~subroutine_circuits.tasks.
hf_tokenizer.HFTaskTokenizer`): a constant readout token (end-of-text, or ``[SEP]`` for
encoders) is appended, and the readout (``pool = "last"``) reads it, so no word reaches the
readout only through its own residual stream. Nothing is downloaded.

Training uses :data:`HF_TRAIN_DEFAULTS` (suited to real models: small learning rate, warm-up,
early stop on validation accuracy), each overridable in ``[train]``. Trained base models are
stored as the folder they came from plus their weights (:func:`save_base` / :func:`load_base`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subroutine_circuits.experiment import hf_paths

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: ``models.TrainConfig`` defaults for checkpoint base models (each overridable in ``[train]``):
#: a fine-tuning learning rate with warm-up, small batches, early stop on validation accuracy.
HF_TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "warmup_steps": 50,
    "batch_size": 16,
    "weight_decay": 0.01,
    "max_steps": 2000,
    "max_epochs": 50,
    "eval_every": 25,
    "patience": 6,
    "grad_clip": 1.0,
    "target_val_acc": 0.99,
    "eval_batch_size": 64,
}
#: Re-initialised base models draw their weights under ``REINIT_SEED_OFFSET + base seed`` (a
#: checkpoint built with ``torch.manual_seed(0)`` must not come back as "re-initialised").
REINIT_SEED_OFFSET = 20_000
#: Files of a stored checkpoint base model (``meta.json`` is written last).
BASE_INFO_FILE = "hf_base.json"
BASE_WEIGHTS_FILE = "weights.pt"
BASE_META_FILE = hf_paths.BASE_META_FILE
is_hf_folder = hf_paths.is_hf_folder  # (a path check shared with experiment.config)


def task_tokenizer(folder: str | os.PathLike) -> Any:
    """The folder's own tokenizer wrapped for task stimuli (causal or encoder from its config).

    The folder is checked first (config, weights, tokenizer files): a ``ValueError`` names
    what is missing."""
    from subroutine_circuits.models.bridge import check_checkpoint_folder
    from subroutine_circuits.models.hf import load_local_tokenizer
    from subroutine_circuits.tasks.hf_tokenizer import HFTaskTokenizer, guess_model_kind

    try:
        check_checkpoint_folder(folder)
    except ValueError as err:
        raise ValueError(f"Hugging Face checkpoint {str(folder)!r} cannot be used: {err}") from err
    tok = load_local_tokenizer(folder)
    return HFTaskTokenizer(tok, kind=guess_model_kind(folder), source=str(folder))


def load_hf_model(
    folder: str | os.PathLike,
    device: str = "cpu",
    reinit_seed: int | None = None,
    backend: str = "auto",
) -> tuple[Any, Any]:
    """Load a checkpoint folder as a TransformerLens model; returns ``(model, HFTaskTokenizer)``.

    ``reinit_seed`` replaces the saved weights by a fresh initialisation of the same
    architecture (``models.bridge.fresh_hf_model``). See ``models.bridge.load_task_model``.
    """
    from subroutine_circuits.models.bridge import load_task_model

    return load_task_model(folder, device=device, backend=backend, reinit_seed=reinit_seed)


# ----------------------------------------------------------------------------- the experiment


def initial_model(cfg: Any, init: str, seed: int, device: str) -> tuple[Any, dict[str, Any]]:
    """The untrained base model of ``init`` from ``cfg.model.checkpoint`` and its metadata:
    the checkpoint's weights for ``pretrained``, a re-initialisation under
    ``REINIT_SEED_OFFSET + seed`` otherwise."""
    folder = str(cfg.model.checkpoint)
    reinit = None if init == "pretrained" else REINIT_SEED_OFFSET + int(seed)
    model, _ = load_hf_model(folder, device=device, reinit_seed=reinit)
    meta: dict[str, Any] = {
        "init": init,
        "seed": seed,
        "checkpoint": folder,
        "model_class": type(model).__name__,
    }
    if reinit is not None:
        meta["reinitialised_from"] = folder
        meta["init_seed"] = reinit
    return model, meta


def train_config(overrides: Any, seed: int, device: str) -> Any:
    """``models.TrainConfig`` from :data:`HF_TRAIN_DEFAULTS`, then ``[train]`` overrides."""
    from subroutine_circuits.models.train import TrainConfig

    return TrainConfig(
        **{**HF_TRAIN_DEFAULTS, "seed": seed, "device": device, "progress": False, **overrides}
    )


def train_composite(adapter: Any, train: Any, val: Any, tcfg: Any) -> Any:
    """Train every weight of ``adapter.model`` on encoded composite problems (4-way
    cross-entropy of the adapter's odd-one-out readout), early stop on validation accuracy,
    best weights restored (``models.train`` loop). Returns the ``TrainResult``."""
    import torch.nn.functional as F

    from subroutine_circuits.models.train import _SupervisedTrainer

    tcfg.validate()
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(True)
    if len(train) == 0 or len(val) == 0:
        raise ValueError("empty train or validation split: no composite problems to train on")

    def batch_step(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = train.batch(idx.to(train.odd.device))
        logits = adapter.ooo_logits(batch.inputs)
        loss = F.cross_entropy(logits, batch.odd)
        return loss, (logits.detach().argmax(-1) == batch.odd).sum()

    def val_accuracy() -> float:
        return adapter.accuracy(val, batch_size=tcfg.eval_batch_size)

    return _SupervisedTrainer(
        model, len(train), batch_step, val_accuracy, tcfg, "train_checkpoint"
    ).fit()


def train_base(model: Any, cfg: Any, prep: Any, seed: int, device: str) -> dict[str, Any]:
    """Train a checkpoint base model on the composite task; returns metadata to store."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.search import encode

    adapter = as_adapter(model, tokenizer=prep.tokenizer, pool=cfg.model.pool)
    tcfg = train_config(dict(cfg.train), seed, device)
    train = encode(adapter, prep.splits["train"]["composite"], device)
    val = encode(adapter, prep.splits["val"]["composite"], device)
    res = train_composite(adapter, train, val, tcfg)
    return {
        "best_val_acc": float(res.best_val_acc),
        "train_steps": int(res.steps),
        "stop_reason": res.stop_reason,
        "train_config": {k: getattr(tcfg, k) for k in HF_TRAIN_DEFAULTS},
    }


# ----------------------------------------------------------------------------- store


def save_base(
    directory: str | os.PathLike, model: Any, meta: dict[str, Any], source: str | None = None
) -> Path:
    """Store a checkpoint base model: its folder (``hf_base.json``), its weights, then
    ``meta.json`` (written last: its presence marks a complete model)."""
    from subroutine_circuits.models.bridge import SOURCE_ATTR
    from subroutine_circuits.models.versions import tl_version
    from subroutine_circuits.utils import atomic_torch_save, atomic_write_json

    source = source or getattr(model, SOURCE_ATTR, None)
    if not source:
        raise ValueError("save_base needs the checkpoint folder the model was loaded from")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "format_version": 1,
        "checkpoint": str(source),
        "model_class": type(model).__name__,
        "transformer_lens": ".".join(map(str, tl_version())),
    }
    atomic_write_json(directory / BASE_INFO_FILE, info)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, directory / BASE_WEIGHTS_FILE)
    atomic_write_json(directory / BASE_META_FILE, dict(meta))
    return directory


def is_stored_base(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a base model written by :func:`save_base`."""
    return (Path(directory) / BASE_INFO_FILE).is_file()


def load_base(directory: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any, dict]:
    """``(model, HFTaskTokenizer, meta)`` of a base model written by :func:`save_base`."""
    import torch

    directory = Path(directory)
    for name in (BASE_INFO_FILE, BASE_WEIGHTS_FILE, BASE_META_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"stored base model {directory} has no {name}")
    info = json.loads((directory / BASE_INFO_FILE).read_text())
    model, tok = load_hf_model(info["checkpoint"], device=device)
    if type(model).__name__ != info.get("model_class"):
        raise ValueError(
            f"stored base model {directory} is a {info.get('model_class')} (TransformerLens "
            f"{info.get('transformer_lens')}); this TransformerLens loads the checkpoint as a "
            f"{type(model).__name__}: rerun with the version it was trained with"
        )
    state = torch.load(directory / BASE_WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    meta = json.loads((directory / BASE_META_FILE).read_text())
    return model, tok, meta
