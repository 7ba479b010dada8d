"""A distributed executor on Dask: one worker per GPU (each pinned to its device), or CPU workers.

Jobs are the study's picklable job objects; the function that runs one job is shipped with it.
A job whose worker dies is re-scheduled by Dask (``retries``); finished jobs are persisted by the
run store inside the job function, so an interrupted sweep resumes by running the same command.

Optional dependency: ``pip install 'subroutine-circuits[dask]'`` (``dask[distributed]``).
On SLURM, start a cluster with ``dask-jobqueue`` and pass its scheduler address (README).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any


def _require_distributed():
    """Import ``distributed`` or raise a clear error naming the optional extra."""
    try:
        import distributed
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "executor 'dask' needs dask.distributed: pip install 'subroutine-circuits[dask]'"
        ) from e
    return distributed


def count_gpus() -> int:
    """Number of CUDA devices visible to this process (0 without torch.cuda)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_specs(n_gpus: int, n_cpu_workers: int, threads_per_worker: int = 1) -> dict[str, dict]:
    """SpecCluster worker specs: ``gpu-i`` pinned to GPU i, ``cpu-j`` with no GPU at all.

    Each worker runs in its own process (a Nanny) with ``CUDA_VISIBLE_DEVICES`` set, so a GPU
    worker sees exactly one device as ``cuda:0``, and a CPU worker sees none.
    """
    distributed = _require_distributed()
    if n_gpus < 0 or n_cpu_workers < 0 or n_gpus + n_cpu_workers == 0:
        raise ValueError(
            f"need at least one worker, got n_gpus={n_gpus}, n_cpu_workers={n_cpu_workers}"
        )
    specs: dict[str, dict] = {}
    base_env = {"OMP_NUM_THREADS": str(threads_per_worker)}
    for i in range(n_gpus):
        specs[f"gpu-{i}"] = {
            "cls": distributed.Nanny,
            "options": {
                "nthreads": 1,
                "env": {**base_env, "CUDA_VISIBLE_DEVICES": str(i), "SC_WORKER_DEVICE": "cuda"},
                "memory_limit": 0,
                "silence_logs": 40,
            },
        }
    for j in range(n_cpu_workers):
        specs[f"cpu-{j}"] = {
            "cls": distributed.Nanny,
            "options": {
                "nthreads": 1,
                "env": {**base_env, "CUDA_VISIBLE_DEVICES": "", "SC_WORKER_DEVICE": "cpu"},
                "memory_limit": 0,
                "silence_logs": 40,
            },
        }
    return specs


@contextmanager
def dask_client(
    scheduler: str | None = None,
    n_gpus: int | None = None,
    n_cpu_workers: int | None = None,
    threads_per_worker: int = 1,
) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` if given, else to a local cluster we start.

    The local cluster has one worker per GPU (``n_gpus`` default: all visible GPUs) plus
    ``n_cpu_workers`` CPU workers (default: none when there are GPUs, else one per core, at most 4).
    """
    distributed = _require_distributed()
    if scheduler:
        client = distributed.Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    gpus = count_gpus() if n_gpus is None else int(n_gpus)
    if n_cpu_workers is None:
        n_cpu_workers = 0 if gpus else max(1, min(4, os.cpu_count() or 1))
    cluster = distributed.SpecCluster(
        workers=worker_specs(gpus, n_cpu_workers, threads_per_worker),
        scheduler={"cls": distributed.Scheduler, "options": {"dashboard_address": None}},
        silence_logs=40,
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def map_jobs(
    client: Any,
    fn: Callable[[Any], Any],
    jobs: Iterable[Any],
    key: Callable[[Any], str],
    retries: int = 2,
) -> Iterator[tuple[Any, Any]]:
    """Submit ``fn(job)`` for every job and yield ``(job, result)`` as they finish.

    ``key(job)`` names the Dask task (stable and unique per job), so a resubmitted job is
    recognised by the scheduler. A job that raises is re-tried ``retries`` times (also when its
    worker dies); the last error is raised here with the job's key.
    """
    distributed = _require_distributed()
    jobs = list(jobs)
    futures = {}
    for job in jobs:
        fut = client.submit(fn, job, key=f"sc-{key(job)}", retries=retries, pure=False)
        futures[fut] = job
    for fut in distributed.as_completed(list(futures)):
        job = futures[fut]
        try:
            result = fut.result()
        except Exception as e:
            raise RuntimeError(f"job {key(job)!r} failed on the Dask cluster: {e}") from e
        yield job, result


def worker_device(default: str = "auto") -> str:
    """The device a job should use on this worker (``SC_WORKER_DEVICE`` set by our cluster)."""
    return os.environ.get("SC_WORKER_DEVICE", default)
