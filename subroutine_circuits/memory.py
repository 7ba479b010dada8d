"""GPU memory of a worker: its budget, chunk sizes from the budget, out-of-memory back-off and
the peak of each job.

Why: several workers (of one study or of several) may share one GPU. A worker that sizes its
forward passes for the whole card (e.g. 16384 sequences per evaluation pass) leaves nothing to
the others, and one of them dies with ``torch.OutOfMemoryError``. Here each worker gets a
**budget** and every chunked computation takes its chunk size from it:

- :func:`job_memory` (one base-model job, ``experiment.stages.run_base_model_job``) sets the
  budget at job start: the configured ``gpu_memory_gb`` (then also a hard cap through
  ``torch.cuda.set_per_process_memory_fraction``), else ``min(DEFAULT_GPU_BUDGET_GB,
  DEVICE_SHARE * total / workers on the GPU)``, lowered to ``DEVICE_SHARE * free`` when less
  is free at job start. The executors tell each worker how many workers share its GPU
  (``SC_WORKERS_PER_GPU``). Between jobs the caching allocator is emptied and the peak
  (``torch.cuda.max_memory_allocated``) is recorded.
- :func:`rows_per_pass` turns the budget into sequences per forward pass for a model
  (:func:`model_row_bytes`: an estimate from its ``cfg``), never more than the call site's cap
  (its former fixed size) and never less than 1. On the CPU there is no budget: the caps stay.
- :func:`run_chunked` / :func:`with_backoff` run a chunked computation; an out-of-memory error
  halves the chunk and retries (a warning names the new size), a chunk of 1 that still runs
  out raises :class:`ChunkOutOfMemoryError`. Nested chunked loops compose: an inner loop that
  fails at 1 makes the outer one halve. A chunk size that had to shrink stays shrunk for the
  rest of the job (per call-site ``key``).

Chunk sizes do not change what is computed (rows of a batch are independent), only float
rounding on GPUs (kernels may differ with batch shape) and, for resample ablation, which
sources are drawn per pass. Set ``gpu_memory_gb`` for chunk sizes that do not depend on the
machine.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

GIB = 2**30
#: Environment variable the executors set in each worker: how many workers share its GPU.
WORKERS_PER_GPU_ENV = "SC_WORKERS_PER_GPU"
#: A worker's budget on a GPU when ``gpu_memory_gb`` is not set (GiB). The library's models
#: (presets, Hugging Face encoders of tens of millions of parameters) need a few GiB; larger
#: budgets only make passes larger, not faster, once the GPU is busy.
DEFAULT_GPU_BUDGET_GB = 8.0
#: Share of a GPU's memory that the workers on it may use together (the rest: CUDA contexts,
#: fragmentation, other processes).
DEVICE_SHARE = 0.9
#: Share of the budget one chunked computation may fill (the rest: the model, the encoded data,
#: ablation values, the allocator's cache).
CHUNK_SHARE = 0.5

#: The out-of-memory error of torch (CUDA; ``torch.cuda.OutOfMemoryError`` is the same class).
OutOfMemoryError = torch.OutOfMemoryError


class ChunkOutOfMemoryError(OutOfMemoryError):
    """Out of memory even with a chunk of one item: the computation cannot be split further.

    A subclass of ``torch.OutOfMemoryError``, so that an enclosing chunked loop halves its own
    chunk in turn.
    """


# ----------------------------------------------------------------------------- the budget
_state: dict[str, Any] = {"budget": None}
#: Per call-site key: the factor (<= 1) its chunks were shrunk by after out-of-memory errors.
_shrunk: dict[str, float] = {}


def workers_on_gpu() -> int:
    """How many workers share this process's GPU (``SC_WORKERS_PER_GPU``, default 1)."""
    try:
        return max(1, int(os.environ.get(WORKERS_PER_GPU_ENV, "1")))
    except ValueError:
        return 1


def _is_cuda(device: Any) -> bool:
    """Whether ``device`` (a string or ``torch.device``) is a CUDA device that exists here."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return kind == "cuda" and torch.cuda.is_available()


def share_of_gpu(total: int, workers: int, free: int | None = None) -> int:
    """A worker's default budget in bytes on a GPU of ``total`` bytes shared by ``workers``:
    ``min(DEFAULT_GPU_BUDGET_GB, DEVICE_SHARE * total / workers)``, lowered to ``DEVICE_SHARE *
    free`` when ``free`` (bytes free at job start) is given and that is less (with a warning)."""
    budget = min(DEFAULT_GPU_BUDGET_GB * GIB, DEVICE_SHARE * total / max(1, int(workers)))
    if free is not None and DEVICE_SHARE * free < budget:
        log.warning(
            "only %.1f GiB of GPU memory free at job start: this worker's budget is %.1f GiB "
            "instead of %.1f GiB",
            free / GIB,
            DEVICE_SHARE * free / GIB,
            budget / GIB,
        )
        budget = DEVICE_SHARE * free
    return int(budget)


def default_budget(device: Any, workers: int | None = None, free: int | None = None) -> int:
    """:func:`share_of_gpu` for CUDA ``device`` (``workers``: default
    :func:`workers_on_gpu`)."""
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return share_of_gpu(total, workers_on_gpu() if workers is None else workers, free)


def budget_bytes(device: Any) -> int | None:
    """The memory budget of chunked computations on ``device`` in bytes: the running job's
    (:func:`job_memory`), else :func:`default_budget` on CUDA; None on the CPU (no budget)."""
    if not _is_cuda(device):
        return None
    if _state["budget"] is not None:
        return int(_state["budget"])
    return default_budget(device)


def chunk_for_budget(budget: float, bytes_per_item: float, cap: int | None = None) -> int:
    """Items per chunk so that ``chunk * bytes_per_item <= budget``: at least 1, at most
    ``cap`` (None: no cap). Less memory never gives a larger chunk."""
    if bytes_per_item <= 0 or not math.isfinite(bytes_per_item):
        raise ValueError(f"bytes_per_item must be a positive number, got {bytes_per_item}")
    n = max(1, int(max(0.0, float(budget)) // float(bytes_per_item)))
    return n if cap is None else max(1, min(int(cap), n))


def transformer_row_bytes(
    pos: int,
    d_model: int,
    n_heads: int,
    d_mlp: int,
    n_layers: int,
    d_head: int | None = None,
    grad: bool = False,
) -> int:
    """Estimated bytes one sequence of ``pos`` tokens needs in a transformer forward pass
    (float32; with ``grad`` also the activations kept for the backward pass).

    Per token and layer: about 16 residual-width tensors (layer norms, q/k/v/z, attention and
    MLP outputs, the residual, mask hooks' mixed copies), 3 attention-score rows
    (scores, pattern, padding-masked copy) and 3 MLP-width tensors. Without gradients about 3
    layers' tensors are alive at once, with gradients every layer's plus 2.
    """
    width = max(int(d_model), int(n_heads) * int(d_head or 0))
    per_token = 16 * width + 3 * int(n_heads) * int(pos) + 3 * int(d_mlp or 0)
    layers = (int(n_layers) + 2) if grad else min(int(n_layers), 2) + 1
    return int(4 * pos * per_token * layers)


def model_row_bytes(model: Any, pos: int, grad: bool = False) -> int | None:
    """:func:`transformer_row_bytes` for a model with a TransformerLens-like ``cfg``
    (``d_model``, ``n_heads``, ``n_layers``, optional ``d_mlp`` / ``d_head``); None when the
    model has no such config (e.g. a CNN: its call sites keep their caps)."""
    cfg = getattr(model, "cfg", None)
    dims = [getattr(cfg, k, None) for k in ("d_model", "n_heads", "n_layers")]
    if cfg is None or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    d_mlp = getattr(cfg, "d_mlp", None)
    d_head = getattr(cfg, "d_head", None)
    return transformer_row_bytes(
        max(1, int(pos)),
        dims[0],
        dims[1],
        d_mlp if isinstance(d_mlp, int) else 0,
        dims[2],
        d_head if isinstance(d_head, int) else None,
        grad,
    )


def model_device(model: Any) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    inner = getattr(model, "model", model)  # an adapter's model
    try:
        return next(inner.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def rows_per_pass(model: Any, pos: int, cap: int, grad: bool = False) -> int:
    """Sequences of ``pos`` tokens per forward pass of ``model`` within the worker's budget
    (:data:`CHUNK_SHARE` of :func:`budget_bytes`): at most ``cap``, at least 1. ``cap`` alone
    on the CPU and for models without a transformer config."""
    cap = max(1, int(cap))
    budget = budget_bytes(model_device(model))
    per_row = model_row_bytes(getattr(model, "model", model), pos, grad)
    if budget is None or per_row is None:
        return cap
    return chunk_for_budget(CHUNK_SHARE * budget, per_row, cap)


# ----------------------------------------------------------------------------- back-off
def free_cached_memory() -> None:
    """Collect garbage and return the caching allocator's free blocks to the device."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _start_chunk(chunk: int, key: str | None) -> int:
    """The first chunk size of a call: ``chunk``, shrunk as ``key``'s earlier back-offs say."""
    chunk = max(1, int(chunk))
    if key is not None and key in _shrunk:
        chunk = max(1, int(chunk * _shrunk[key]))
    return chunk


def _halve(chunk: int, requested: int, label: str, key: str | None, where: str) -> int:
    """The chunk after an out-of-memory error; per ``key`` the factor ``new / requested`` is
    remembered for the rest of the job (later calls start there)."""
    new = max(1, chunk // 2)
    if key is not None:
        _shrunk[key] = min(_shrunk.get(key, 1.0), new / max(1, int(requested)))
    log.warning(
        "out of GPU memory with %d %s per chunk%s; retrying with %d",
        chunk,
        label,
        where,
        new,
    )
    return new


def _too_small(label: str, key: str | None, cause: BaseException) -> ChunkOutOfMemoryError:
    """The error of a chunk of 1 that still runs out of memory (what to change, the cause)."""
    budget = _state["budget"]
    where = f" ({key})" if key else ""
    have = f"; the worker's budget is {budget / GIB:.1f} GiB" if budget else ""
    return ChunkOutOfMemoryError(
        f"out of GPU memory even with chunks of 1 ({label}){where}{have}: the "
        "computation does not fit. Use fewer workers per GPU, a smaller model or shorter "
        f"inputs, or a larger gpu_memory_gb (original error: {cause})"
    )


def run_chunked(
    fn: Callable[[Sequence[T]], R],
    items: Sequence[T],
    chunk: int,
    *,
    label: str = "items",
    key: str | None = None,
) -> list[R]:
    """``[fn(items[i:i + chunk]) for i in range(0, len(items), chunk)]``, with out-of-memory
    back-off: a chunk that runs out of memory is retried with half the size (the finished
    chunks are kept), and later chunks use the smaller size. ``items`` may be a ``range``
    (``fn`` gets sub-ranges). ``label`` names the items in the warning; ``key`` names the call
    site, whose shrunk size is remembered for the rest of the job (:func:`job_memory`).

    Raises:
        ChunkOutOfMemoryError: a chunk of 1 item still runs out of memory.
    """
    n = len(items)
    size = _start_chunk(chunk, key)
    out: list[R] = []
    i = 0
    while i < n:
        part = items[i : i + size]
        try:
            result = fn(part)
        except OutOfMemoryError as e:
            if size <= 1:
                raise _too_small(label, key, e) from e
            failed = True
        else:
            failed = False
        if failed:  # outside the except block: the failed attempt's tensors are released
            free_cached_memory()
            size = _halve(size, chunk, label, key, f" at item {i} of {n}")
            continue
        out.append(result)
        i += len(part)
    return out


def with_backoff(
    fn: Callable[[int], R], chunk: int, *, label: str = "rows", key: str | None = None
) -> R:
    """``fn(chunk)``, called again with half the chunk whenever it runs out of memory (for
    computations that plan their own chunks from one size, e.g. the packed patching path).

    Raises:
        ChunkOutOfMemoryError: ``fn(1)`` still runs out of memory.
    """
    size = _start_chunk(chunk, key)
    while True:
        try:
            return fn(size)
        except OutOfMemoryError as e:
            if size <= 1:
                raise _too_small(label, key, e) from e
        free_cached_memory()
        size = _halve(size, chunk, label, key, "")


# ----------------------------------------------------------------------------- one job
def _fraction_api() -> tuple[Any, Any]:
    """``(get, set)`` of the per-process memory fraction (``get`` None on old torch)."""
    return (
        getattr(torch.cuda, "get_per_process_memory_fraction", None),
        torch.cuda.set_per_process_memory_fraction,
    )


@contextmanager
def job_memory(device: Any, gpu_memory_gb: float | None = None) -> Iterator[dict[str, Any]]:
    """The memory of one job on ``device``: sets the worker's budget (see the module
    docstring), resets the peak statistics, and on exit empties the allocator's cache and
    fills the yielded dict with ``peak_gpu_memory_gb`` (``max_memory_allocated``; None on the
    CPU) and ``gpu_memory_budget_gb`` (None on the CPU). The previous budget and memory
    fraction are restored on exit (in-process runs leave the process as they found it)."""
    record: dict[str, Any] = {"peak_gpu_memory_gb": None, "gpu_memory_budget_gb": None}
    if not _is_cuda(device):
        try:
            yield record
        finally:
            gc.collect()
        return
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    free_cached_memory()
    previous_budget, previous_shrunk = _state["budget"], dict(_shrunk)
    get_fraction, set_fraction = _fraction_api()
    previous_fraction = get_fraction(dev) if (get_fraction and gpu_memory_gb) else None
    if gpu_memory_gb is not None:
        budget = int(min(float(gpu_memory_gb) * GIB, total))
        if gpu_memory_gb * GIB > total:
            log.warning("gpu_memory_gb = %s exceeds the GPU's %.1f GiB", gpu_memory_gb, total / GIB)
        set_fraction(budget / total, dev)
    else:
        budget = default_budget(dev, free=torch.cuda.mem_get_info(dev)[0])
    _state["budget"] = budget
    _shrunk.clear()
    record["gpu_memory_budget_gb"] = budget / GIB
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        yield record
    finally:
        record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(dev) / GIB
        _state["budget"] = previous_budget
        _shrunk.clear()
        _shrunk.update(previous_shrunk)
        if gpu_memory_gb is not None:
            set_fraction(1.0 if previous_fraction is None else previous_fraction, dev)
        free_cached_memory()
