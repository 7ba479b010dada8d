"""Small shared helpers: atomic file writes and seeding."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through an in-memory buffer and an atomic rename."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch RNGs (for code paths that use the global RNG)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]):
    """``(__getattr__, __dir__)`` for a package whose names load from submodules on first use.

    ``exports`` maps a public name to the submodule that defines it; the first access imports
    the submodule and caches the value in ``namespace`` (the package's ``globals()``), so heavy
    dependencies (torch, TransformerLens) are imported only when needed.
    """
    import importlib

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


#: Chance accuracy of a 4-way odd-one-out problem.
CHANCE = 0.25


def clipped_diff(target: Any, other: Any, chance: float = CHANCE) -> Any:
    """The paper's chance-clipped difference ``max(target, chance) - max(other, chance)``.

    Works on scalars (returns a float; NaN if either input is NaN) and on arrays (element-wise,
    returns a numpy array). The one implementation used by the mask evaluation, patching's
    cross-ablation and the summary statistics.
    """
    import numpy as np

    t = np.maximum(np.asarray(target, dtype=float), chance)
    o = np.maximum(np.asarray(other, dtype=float), chance)
    out = t - o
    return float(out) if out.ndim == 0 else out


def resolve_device(device: str | None = "auto") -> str:
    """``"auto"``/None -> ``"cuda"`` when available, else ``"cpu"``; other values are checked.

    Raises ValueError for an unknown device string or a CUDA device on a machine without CUDA.
    """
    import torch

    device = "auto" if device is None else str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        return device
    if device in ("cpu", "mps") or device.startswith("cpu"):
        return device
    raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


#: Problems per forward pass when scoring without gradients: a GPU is kept busy by large
#: batches (a 4-layer d_model 512 model at 2048 problems x 4 stimuli x ~12 tokens needs a few
#: GiB), a CPU gains nothing beyond a few hundred.
EVAL_BATCH = {"cpu": 256, "cuda": 2048}


def eval_batch_size(device: Any) -> int:
    """Default problems per evaluation forward pass on ``device`` (:data:`EVAL_BATCH`)."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return EVAL_BATCH.get(kind, EVAL_BATCH["cpu"])


#: ``mask.autocast`` values -> autocast dtype names (None: full precision).
AUTOCAST_DTYPES = {"none": None, "bf16": "bfloat16"}


def autocast_dtype(mode: str | None) -> Any:
    """The torch dtype of an autocast mode (``"none"``/None -> None, ``"bf16"`` ->
    ``torch.bfloat16``); raises ValueError naming an unknown mode."""
    if mode is None:
        return None
    if mode not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast mode {mode!r}; choose one of {list(AUTOCAST_DTYPES)}")
    name = AUTOCAST_DTYPES[mode]
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def autocast_context(device: Any, mode: str | None) -> Any:
    """``torch.autocast`` for ``mode`` on ``device``'s type, or a null context for "none"."""
    import contextlib

    import torch

    dtype = autocast_dtype(mode)
    if dtype is None:
        return contextlib.nullcontext()
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return torch.autocast(device_type=kind, dtype=dtype)


def real_positions(lengths: Any, n_pos: int) -> Any:
    """``Bool[Tensor, "n pos"]``: True at real positions ``pos < length`` of right-padded rows.

    The one padding helper: key-padding masks are its negation.
    """
    import torch

    lengths = torch.as_tensor(lengths)
    return torch.arange(n_pos, device=lengths.device)[None, :] < lengths[:, None].to(torch.long)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: unchanged), then restore the
    previous number. One thread makes CPU results bit-reproducible."""
    import torch

    if n is None:
        yield
        return
    if int(n) < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def saved_class_name(model: object) -> str:
    """The class name a model is recorded under (checkpoints, mask files, run signatures).

    ``NativeTransformer`` computes what TransformerLens 3.9's ``HookedTransformer`` does (same
    parameters, hooks and outputs), so it is recorded as ``"HookedTransformer"``: files written
    on either TransformerLens version load on the other.
    """
    name = type(model).__name__
    return "HookedTransformer" if name == "NativeTransformer" else name
