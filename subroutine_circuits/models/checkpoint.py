"""Save and load trained models: config + vocabulary + weights + metadata, written atomically.

Layout of a checkpoint directory::

    config.json   HookedTransformerConfig as a dict, plus the model class and pooling
    vocab.json    tokenizer.to_dict() (absent when saved without a tokenizer)
    weights.pt    the model's state_dict (CPU tensors)
    meta.json     free-form user metadata (task, seed, accuracies, ...)
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from subroutine_circuits.models.presets import POOL_ATTR
from subroutine_circuits.utils import atomic_torch_save, atomic_write_json

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_MODEL_CLASSES = ("HookedTransformer", "HookedEncoder")


def _config_to_json(cfg: Any) -> dict[str, Any]:
    """A JSON-able dict of a ``HookedTransformerConfig`` (dtype as its name)."""
    d = cfg.to_dict()
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "dtype":
            out[k] = str(v).replace("torch.", "")
        elif k == "device":
            out[k] = str(v) if v is not None else None
        else:
            out[k] = v
    json.dumps(out)  # fail here, not half-way through writing, if something is not JSON-able
    return out


def save_checkpoint(
    directory: str | os.PathLike,
    model: Any,
    tokenizer: Any | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (+ ``tokenizer`` vocabulary, + ``meta``) to ``directory``; returns it.

    Each file is written atomically; ``meta.json`` is written last, so a directory with a
    ``meta.json`` holds a complete checkpoint.
    """
    directory = Path(directory)
    from subroutine_circuits.utils import saved_class_name

    cls = saved_class_name(model)  # a NativeTransformer is saved as the HookedTransformer it equals
    if cls not in _MODEL_CLASSES:
        raise ValueError(f"can only save {_MODEL_CLASSES}, got {cls}")
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "model_class": cls,
        "pool": getattr(model, POOL_ATTR, None),
        "cfg": _config_to_json(model.cfg),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write_json(directory / CONFIG_FILE, config)
    if tokenizer is not None:
        atomic_write_json(directory / VOCAB_FILE, tokenizer.to_dict())
    elif (directory / VOCAB_FILE).exists():
        (directory / VOCAB_FILE).unlink()
    atomic_torch_save(state, directory / WEIGHTS_FILE)
    atomic_write_json(directory / META_FILE, dict(meta or {}))
    return directory


def load_checkpoint(
    directory: str | os.PathLike, device: str = "cpu", backend: str = "auto"
) -> tuple[Any, Any | None, dict[str, Any]]:
    """Rebuild ``(model, tokenizer_or_None, meta)`` saved by ``save_checkpoint``.

    The model has the saved config and weights (identical outputs), is in eval mode and lives
    on ``device``. A saved ``HookedTransformer`` loads as ``presets.make_model`` builds models
    (``backend``: ``"auto"`` = TransformerLens' class on 3.x, ``NativeTransformer`` on 4.x;
    ``"tl"``; ``"native"``); a ``HookedEncoder`` needs TransformerLens 3.x. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` for an unknown format.
    """
    import torch

    from subroutine_circuits.models.presets import BACKENDS
    from subroutine_circuits.models.versions import tl_major, tl_version

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name}")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory}: unsupported format_version {config.get('format_version')!r}"
        )
    cls_name = config.get("model_class")
    if cls_name not in _MODEL_CLASSES:
        raise ValueError(f"checkpoint {directory}: unknown model_class {cls_name!r}")
    cfg_dict = dict(config["cfg"])
    cfg_dict["dtype"] = getattr(torch, cfg_dict.get("dtype", "float32"))
    cfg_dict["device"] = "cpu"
    saved_seed = cfg_dict.pop("seed", None)
    cfg_dict["init_weights"] = False
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        backend = "tl" if tl_major() < 4 or cls_name == "HookedEncoder" else "native"
    if backend == "native" and cls_name == "HookedTransformer":
        from subroutine_circuits.models.native import NativeConfig, NativeTransformer

        cfg, cls = NativeConfig.from_dict(cfg_dict), NativeTransformer
    elif tl_major() >= 4:
        raise ValueError(
            f"checkpoint {directory} holds a {cls_name}, which needs TransformerLens 3.x "
            f"(installed: {'.'.join(map(str, tl_version()))}); save the model as a Hugging Face "
            "folder to use it on 4.x"
        )
    else:
        from transformer_lens import HookedEncoder, HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig.from_dict(cfg_dict)
        cls = HookedTransformer if cls_name == "HookedTransformer" else HookedEncoder
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated", category=DeprecationWarning)
        model = cls(cfg, move_to_device=False)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.cfg.seed = saved_seed
    if device != "cpu":
        model.to(device, print_details=False)
    model.eval()
    if config.get("pool") is not None:
        setattr(model, POOL_ATTR, config["pool"])

    tokenizer = None
    if (directory / VOCAB_FILE).is_file():
        from subroutine_circuits.tasks import WordTokenizer

        tokenizer = WordTokenizer.from_dict(json.loads((directory / VOCAB_FILE).read_text()))
    meta = json.loads((directory / META_FILE).read_text())
    return model, tokenizer, meta
