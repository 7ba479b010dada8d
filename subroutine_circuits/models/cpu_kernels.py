"""A faster attention softmax for TransformerLens models on the CPU.

On the CPU, ``torch.softmax`` over a short last dimension (the attention pattern of sentences of
about ten tokens) spends its time in per-row overhead: measured on this project's 2-core machine
(one thread, scores ``[256, 8, 12, 12]``) it takes 5.1 ms forward and 20 ms forward + backward,
against 1.8 ms and 3.0 ms for the same function written as ``exp(x - max) / sum`` with its own
backward (``benchmarks/bench_cpu_softmax.py``). The attention softmax was about a fifth of a
demo base model's wall time.

:func:`fast_cpu_attention` is a context manager under which TransformerLens' attention
(``transformer_lens.components.abstract_attention``, the ``HookedTransformer`` of 3.x) computes
its softmax over the last dimension of CPU tensors with :func:`softmax_lastdim`; every other
call goes to ``torch.nn.functional`` unchanged. Results equal ``torch.softmax`` up to float
rounding (about 1e-7; rows that are all ``-inf`` give NaN in both, which TransformerLens then
zeroes). The experiment runner enters it for every base-model job on the CPU. This library's
own :class:`~subroutine_circuits.models.native.NativeTransformer` (the preset model on
TransformerLens 4) asks :func:`attention_softmax`, which follows the same switch; bridges are
left as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


class _LastDimSoftmax(torch.autograd.Function):
    """softmax over the last dimension: ``exp(x - max) / sum``, backward ``y * (g - <g, y>)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        e = (x - x.amax(-1, keepdim=True)).exp_()
        y = e.div_(e.sum(-1, keepdim=True))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


def softmax_lastdim(x: Float[Tensor, "... k"]) -> Float[Tensor, "... k"]:
    """Softmax over the last dimension of ``x`` (differentiable); equals ``torch.softmax(x, -1)``
    up to float rounding."""
    return _LastDimSoftmax.apply(x)


class _Functional:
    """``torch.nn.functional`` with ``softmax`` over the last dimension of CPU float tensors
    replaced by :func:`softmax_lastdim`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    @staticmethod
    def softmax(x: Tensor, dim: int | None = None, *args: Any, **kwargs: Any) -> Tensor:
        last = dim is not None and (dim == -1 or dim == x.dim() - 1)
        plain = not args and kwargs.get("dtype") is None and not kwargs.get("_stacklevel", 0)
        if last and plain and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            return softmax_lastdim(x)
        return F.softmax(x, dim, *args, **kwargs)


_lock = threading.Lock()
_depth = 0


def _attention_module() -> Any:
    """TransformerLens 3.x's attention module, or None (not installed, or 4.x: no model of
    this library runs TransformerLens's own attention there, and importing it would cost each
    worker process seconds)."""
    from subroutine_circuits.models.versions import tl_major

    if tl_major() >= 4:
        return None
    try:
        from transformer_lens.components import abstract_attention
    except ImportError:
        return None
    return abstract_attention if getattr(abstract_attention, "F", None) is not None else None


def attention_softmax(x: Float[Tensor, "... k"]) -> Float[Tensor, "... k"]:
    """The attention softmax of :class:`models.native.NativeTransformer`: :func:`softmax_lastdim`
    for CPU float tensors inside :func:`fast_cpu_attention`, ``torch.softmax`` otherwise."""
    if _depth > 0:
        return _Functional.softmax(x, dim=-1)
    return F.softmax(x, dim=-1)


def attention_pattern(x: Float[Tensor, "... k"]) -> Float[Tensor, "... k"]:
    """The attention pattern of :class:`models.native.NativeTransformer`: the softmax of
    :func:`attention_softmax` with NaN entries (rows whose every key is masked) set to zero,
    as TransformerLens does.

    Without autograd on CPU float tensors inside :func:`fast_cpu_attention` (mask evaluation)
    the zeroing pass runs only when a row's maximum is not finite (the only way a NaN can
    arise: otherwise the maximum contributes ``exp(0) = 1`` to every row's sum): the same
    numbers, bit for bit, without two passes over the scores per layer."""
    fused = (
        _depth > 0
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
    )
    if not fused:
        p = attention_softmax(x)
        return torch.where(torch.isnan(p), torch.zeros_like(p), p)
    m = x.amax(-1, keepdim=True)
    e = (x - m).exp_()  # the operations of softmax_lastdim, in its order
    y = e.div_(e.sum(-1, keepdim=True))
    if not bool(torch.isfinite(m).all()):
        y = torch.where(torch.isnan(y), torch.zeros_like(y), y)
    return y


@contextmanager
def fast_cpu_attention(enabled: bool = True) -> Iterator[None]:
    """Within the block, attention (TransformerLens 3.x's and :class:`NativeTransformer`'s)
    softmaxes CPU tensors with :func:`softmax_lastdim` (see the module docstring). Re-entrant and
    thread-safe (the swap is undone when the outermost block ends)."""
    global _depth
    if not enabled:
        yield
        return
    mod = _attention_module()
    with _lock:
        if _depth == 0 and mod is not None:
            mod.F = _Functional()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and mod is not None:
                mod.F = F
