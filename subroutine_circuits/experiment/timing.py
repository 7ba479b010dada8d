"""Per-stage wall times of the study, summed across jobs and across resumed invocations.

Stage functions are decorated with :func:`timed_stage`; a job runs them inside
:func:`collect_stage_times`, which returns the seconds spent per stage in that job. The runner
sums them over jobs for one invocation, and :func:`accumulate` keeps the running totals of every
invocation into one output folder (``manifest.json``: ``invocations`` and ``timings_total``).

Stage seconds are summed over jobs: with several workers they add up to more than the wall time
(they are worker-seconds); ``wall_s`` is the elapsed time of the invocation.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: Stages the manifest reports, in order (``<stage>_s`` keys).
STAGES = ("base_model", "mask_search", "evaluation", "patching", "summary", "report")

_current: ContextVar[dict[str, float] | None] = ContextVar("sc_stage_times", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the time spent in the ``with`` block to stage ``name`` of the current collection
    (no effect outside :func:`collect_stage_times`)."""
    acc = _current.get()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if acc is not None:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0


def timed_stage(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: every call of the function counts towards stage ``name``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with stage(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


@contextmanager
def collect_stage_times() -> Iterator[dict[str, float]]:
    """Collect the stage times of the enclosed code into the yielded dict (``name -> s``)."""
    acc: dict[str, float] = {}
    token = _current.set(acc)
    try:
        yield acc
    finally:
        _current.reset(token)


def sum_stage_times(per_job: list[dict[str, Any]]) -> dict[str, float]:
    """``{"<stage>_s": total}`` over jobs' ``stage_times`` dicts (every known stage present)."""
    out = {f"{s}_s": 0.0 for s in STAGES}
    for times in per_job:
        for name, sec in (times or {}).items():
            out[f"{name}_s"] = out.get(f"{name}_s", 0.0) + float(sec)
    return out


def accumulate(previous: dict[str, Any], invocation: dict[str, Any]) -> dict[str, Any]:
    """Running totals: ``previous`` (a ``timings_total`` dict, may be empty) plus one
    invocation's ``wall_s`` and ``<stage>_s`` numbers; counts invocations."""
    total = {k: float(v) for k, v in previous.items() if k != "invocations"}
    for key, value in invocation.items():
        if key == "wall_s" or key.endswith("_s"):
            total[key] = total.get(key, 0.0) + float(value)
    total["invocations"] = int(previous.get("invocations", 0)) + 1
    return total
