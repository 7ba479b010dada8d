"""Load a local Hugging Face checkpoint folder on TransformerLens 3.9 or 4.x, offline.

:func:`load_local_model` takes a folder written by ``save_pretrained`` (``config.json``, weights
and the tokenizer files) and returns ``(model, tokenizer)``:

- TransformerLens 4.x: ``TransformerBridge.boot_transformers(folder, tokenizer=...)``; every
  architecture the bridge supports loads (GPT-2, BERT, GPT-NeoX/Pythia, Llama, ...). The
  folder's own tokenizer is loaded first and handed to the bridge: without it, the bridge
  builds one from the folder name, which for a folder without tokenizer files is an empty
  tokenizer (one token, encodes nothing) rather than an error.
- TransformerLens 3.x: :func:`subroutine_circuits.models.hf.load_hf_checkpoint` (GPT-2 ->
  ``HookedTransformer``, BERT -> ``HookedEncoder``).

Both return the model in eval mode with outputs equal to the Hugging Face model's. Nothing is
downloaded: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set during loading and the
tokenizer is read with ``local_files_only=True``. Importing this module imports neither
``transformers`` nor ``transformer_lens``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from subroutine_circuits.models.hf import (
    TOKENIZER_FILES,
    WEIGHT_FILES,
    _offline_env,
    has_tokenizer,
    load_local_tokenizer,
)
from subroutine_circuits.models.tl_compat import tl_major

BACKENDS = ("auto", "hooked", "bridge")
#: Attribute naming the folder a model was loaded from (``BridgeAdapter.reinit`` uses it).
SOURCE_ATTR = "sc_source"


def check_checkpoint_folder(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Validate a checkpoint folder; return ``(folder, config.json dict)``.

    Raises ``ValueError`` naming the problem: not a directory, no / invalid ``config.json``,
    no weights file, or no tokenizer files (every stimulus is encoded with the folder's own
    tokenizer, so one is required).
    """
    from subroutine_circuits.models.hf import read_checkpoint_config

    directory, config = read_checkpoint_config(path)
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"no weights file in checkpoint folder {str(directory)!r}; expected one of: "
            f"{', '.join(WEIGHT_FILES)}"
        )
    if not has_tokenizer(directory):
        raise ValueError(
            f"no tokenizer files in checkpoint folder {str(directory)!r}; expected one of "
            f"{', '.join(TOKENIZER_FILES)} (save the tokenizer with save_pretrained next to "
            "the model)"
        )
    return directory, config


def architecture_of(config: dict[str, Any]) -> str:
    """``architectures[0]`` of a ``config.json`` dict, else its ``model_type``."""
    archs = config.get("architectures") or []
    if archs:
        return str(archs[0])
    return str(config.get("model_type", "<unknown>"))


def load_local_model(
    path: str | os.PathLike,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    hf_model: Any | None = None,
) -> tuple[Any, Any]:
    """Load a local Hugging Face checkpoint folder and its own tokenizer, without network access.

    Args:
        path: folder written by ``save_pretrained`` (config, weights, tokenizer).
        device: device of the returned model.
        dtype: parameter dtype.
        backend: ``"auto"`` (bridge on TransformerLens 4.x, ``HookedTransformer`` /
            ``HookedEncoder`` on 3.x), ``"hooked"`` (3.x only) or ``"bridge"``.
        hf_model: a Hugging Face model of the folder's architecture used instead of the saved
            weights (e.g. freshly initialised from the folder's config); config and tokenizer
            still come from the folder.

    Returns:
        ``(model, tokenizer)``: the TransformerLens model in eval mode and the folder's
        ``transformers`` tokenizer (wrap it with ``tasks.hf_tokenizer.HFTaskTokenizer`` for
        task stimuli).

    Raises:
        ValueError: the folder is incomplete (see :func:`check_checkpoint_folder`), the backend
            is unknown or unavailable, or TransformerLens cannot wrap the architecture.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    directory, config = check_checkpoint_folder(path)
    major = tl_major()
    if backend == "hooked" and major >= 4:
        raise ValueError(
            "backend='hooked' needs TransformerLens 3.x (HookedTransformer / HookedEncoder were "
            "removed in 4.0); use backend='bridge' or 'auto'"
        )
    if backend == "hooked" or (backend == "auto" and major < 4):
        from subroutine_circuits.models.hf import load_hf_checkpoint

        model, tokenizer = load_hf_checkpoint(
            directory, device=device, dtype=dtype, hf_model=hf_model
        )
        return model, tokenizer

    tokenizer = load_local_tokenizer(directory)
    from transformer_lens.model_bridge import TransformerBridge

    if hf_model is not None:  # the bridge wraps a given model where it lies: place it first
        hf_model = hf_model.to(device=device, dtype=dtype)

    arch = architecture_of(config)
    try:
        with _offline_env(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = TransformerBridge.boot_transformers(
                str(directory), device=device, dtype=dtype, tokenizer=tokenizer, hf_model=hf_model
            )
    except (OSError, ValueError, KeyError, NotImplementedError, TypeError) as err:
        raise ValueError(
            f"TransformerLens {'.'.join(map(str, _tl_version()))} could not load the "
            f"{arch} checkpoint in {str(directory)!r}: {err}"
        ) from err
    model.eval()
    return model, tokenizer


def _tl_version() -> tuple[int, ...]:
    from subroutine_circuits.models.tl_compat import tl_version

    return tl_version()


def load_task_model(
    path: str | os.PathLike,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    reinit_seed: int | None = None,
) -> tuple[Any, Any]:
    """:func:`load_local_model`, with the tokenizer wrapped for task stimuli.

    Returns ``(model, HFTaskTokenizer)``; the tokenizer's kind (causal / encoder) follows the
    folder's ``config.json`` and its vocabulary must fit the model's ``d_vocab``.
    ``reinit_seed`` replaces the saved weights by a fresh initialisation of the same
    architecture (:func:`fresh_hf_model`). The model is in eval mode and remembers its folder
    (attribute :data:`SOURCE_ATTR`).
    """
    from subroutine_circuits.tasks.hf_tokenizer import HFTaskTokenizer, guess_model_kind

    hf_model = None if reinit_seed is None else fresh_hf_model(path, reinit_seed)
    model, tokenizer = load_local_model(
        path, device=device, dtype=dtype, backend=backend, hf_model=hf_model
    )
    task_tok = HFTaskTokenizer(tokenizer, kind=guess_model_kind(path), source=str(path))
    if task_tok.vocab_size > int(model.cfg.d_vocab):
        raise ValueError(
            f"the tokenizer in {str(path)!r} has {task_tok.vocab_size} ids but the model's "
            f"vocabulary has {model.cfg.d_vocab}"
        )
    setattr(model, SOURCE_ATTR, str(path))
    model.eval()
    return model, task_tok


def fresh_hf_model(folder: str | os.PathLike, seed: int) -> Any:
    """A Hugging Face model of the folder's architecture, freshly initialised under ``seed``.

    The model class's own initialiser (``PreTrainedModel.__init__`` -> ``_init_weights``) draws
    the weights; the global torch RNG is left untouched.
    """
    import transformers

    directory, config_dict = check_checkpoint_folder(folder)
    arch = architecture_of(config_dict)
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"transformers has no model class {arch!r} (from {directory}/config.json)")
    with _offline_env():
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(int(seed))
        model = cls(config)
    return model.eval()
