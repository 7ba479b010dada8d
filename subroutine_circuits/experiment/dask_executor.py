"""Dask plumbing of the distributed executor: local clusters, job submission, worker identity.

A local cluster started by the tool has one worker process per GPU, each pinned to its device
with ``CUDA_VISIBLE_DEVICES`` (so it sees it as ``cuda:0``), or CPU workers on a machine without
GPUs; ``scheduler=ADDRESS`` connects to a cluster started elsewhere instead (e.g. SLURM through
``dask-jobqueue``, see docs/SCALING.md). Each worker runs one job at a time.

Jobs are the study's picklable job objects. A job that raises is retried ``retries`` times; a job
whose worker process dies (killed, out of memory, ``os._exit``) is re-scheduled by the Dask
scheduler on a live worker (the nanny restarts the dead one), up to the scheduler's
``distributed.scheduler.allowed-failures`` (default 3). Finished work is persisted by the run
store inside the job function, so an interrupted sweep resumes by running the same command.

Optional dependency: ``pip install 'subroutine-circuits[dask]'`` (``dask[distributed]``).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

#: Environment variables our local cluster sets in each worker process.
DEVICE_ENV = "SC_WORKER_DEVICE"
NAME_ENV = "SC_WORKER_NAME"
WORKERS_PER_GPU_ENV = "SC_WORKERS_PER_GPU"  # subroutine_circuits.memory.WORKERS_PER_GPU_ENV


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


#: Dask settings of our workers: the statistical profiler samples every thread's stack every
#: 10 ms while holding the GIL, which slows Python-heavy jobs (hooked models).
WORKER_DASK_ENV = {"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}
#: Nanny settings of our local clusters. Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every
#: worker by default (to return memory to the OS sooner); glibc then trims its heap after
#: nearly every freed tensor, and our jobs ran 1.8x slower than in-process (measured on CPU,
#: tiny models). ``None`` leaves the variable unset (glibc's adaptive default).
NANNY_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def _nanny_spec(distributed: Any, name: str, env: dict[str, str]) -> dict[str, Any]:
    """One worker process (a Nanny, which restarts it if it dies) running one task at a time."""
    return {
        "cls": distributed.Nanny,
        "options": {
            "nthreads": 1,
            "name": name,
            "env": {**WORKER_DASK_ENV, **env, NAME_ENV: name},
            "memory_limit": 0,
            "silence_logs": 40,
        },
    }


def worker_specs(
    n_gpus: int,
    n_workers: int | None = None,
    cpu_workers: int = 0,
    threads: int | None = None,
) -> dict[str, dict]:
    """``SpecCluster`` worker specs for a machine with ``n_gpus`` GPUs.

    With GPUs: ``n_workers`` GPU workers (default one per GPU) pinned round-robin, worker ``i``
    to GPU ``i % n_gpus`` (more workers than GPUs share them: useful when small models leave a
    GPU idle between kernel launches; each is told how many share its GPU,
    ``SC_WORKERS_PER_GPU``, which divides the GPU's memory among them, see
    :mod:`subroutine_circuits.memory`), plus ``cpu_workers`` CPU workers. Without GPUs:
    ``n_workers`` CPU workers (default one per core, at most 4). Each worker gets ``threads``
    torch/OpenMP threads (default: the cores divided among the workers).
    """
    distributed = _require_distributed()
    if n_gpus < 0 or cpu_workers < 0 or (n_workers is not None and n_workers < 1):
        raise ValueError(
            f"bad worker counts: n_gpus={n_gpus}, n_workers={n_workers}, "
            f"cpu_workers={cpu_workers} (n_workers must be >= 1, the others >= 0)"
        )
    cores = os.cpu_count() or 1
    if n_gpus:
        gpu_workers = n_gpus if n_workers is None else int(n_workers)
    else:
        gpu_workers = 0
        cpu_workers += max(1, min(4, cores)) if n_workers is None else int(n_workers)
    total = gpu_workers + cpu_workers
    per = str(threads if threads is not None else max(1, cores // total))
    specs: dict[str, dict] = {}
    for i in range(gpu_workers):
        gpu = i % n_gpus
        env = {"OMP_NUM_THREADS": per, "CUDA_VISIBLE_DEVICES": str(gpu), DEVICE_ENV: "cuda",
               WORKERS_PER_GPU_ENV: str(len(range(gpu, gpu_workers, n_gpus)))}  # fmt: skip
        specs[f"gpu{gpu}-w{i}"] = _nanny_spec(distributed, f"gpu{gpu}-w{i}", env)
    for j in range(cpu_workers):
        env = {"OMP_NUM_THREADS": per, "CUDA_VISIBLE_DEVICES": "", DEVICE_ENV: "cpu"}
        specs[f"cpu-w{j}"] = _nanny_spec(distributed, f"cpu-w{j}", env)
    return specs


@contextmanager
def dask_client(
    scheduler: str | None = None,
    n_workers: int | None = None,
    n_gpus: int | None = None,
    cpu_workers: int = 0,
    threads: int | None = None,
) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` if given, else to a local cluster we start
    (and close on exit) with :func:`worker_specs` (``n_gpus`` default: all visible GPUs)."""
    distributed = _require_distributed()
    if scheduler:
        client = distributed.Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    gpus = count_gpus() if n_gpus is None else int(n_gpus)
    with dask.config.set(NANNY_CONFIG):
        cluster = distributed.SpecCluster(
            workers=worker_specs(gpus, n_workers, cpu_workers, threads),
            scheduler={
                "cls": distributed.Scheduler,
                "options": {"dashboard": False, "dashboard_address": ":0"},  # any free port
            },
            silence_logs=40,
        )
    client = distributed.Client(cluster)
    try:
        client.wait_for_workers(len(cluster.worker_spec), timeout=300)
        yield client
    finally:
        client.close()
        cluster.close()


def worker_device(default: str = "auto") -> str:
    """The device a job should use on this worker: ``default`` unless it is ``"auto"``, then
    the device our cluster gave the worker (``SC_WORKER_DEVICE``), else cuda when visible."""
    from subroutine_circuits.utils import resolve_device

    if default != "auto":
        return resolve_device(default)
    return resolve_device(os.environ.get(DEVICE_ENV, "auto"))


def worker_identity() -> dict[str, str]:
    """``{"worker": name, "device": ..., "device_name": ...}`` of the process this runs in."""
    name = os.environ.get(NAME_ENV) or f"{socket.gethostname()}:{os.getpid()}"
    device = worker_device("auto")
    device_name = device
    if device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(0)
    return {"worker": name, "device": device, "device_name": device_name}


def _identity(x: Any) -> Any:
    """A task whose result is its argument (ships a large function once per worker)."""
    return x


def _call(fn: Callable[[Any], Any], job: Any) -> tuple[Any, dict[str, str]]:
    """Worker side of one job: ``(fn(job), where it ran)``."""
    return fn(job), worker_identity()


def map_jobs(
    client: Any,
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    keys: Sequence[str] | None = None,
    retries: int = 2,
) -> Iterator[tuple[int, Any, dict[str, str]]]:
    """Submit ``fn(job)`` for every job; yield ``(index, result, worker identity)`` as they end.

    ``fn`` is shipped once, as a task of its own whose result every job depends on (its data,
    e.g. the prepared task splits, travels to each worker once, and is recomputed if the worker
    holding it dies). Jobs run in the order given (earlier = higher priority). ``keys`` name
    the Dask tasks (default: the jobs' ``key`` attribute or their index), prefixed by a fresh
    token so that two sweeps on one shared scheduler never collide. Jobs that fail after their
    retries are reported together at the end (``RuntimeError`` naming each), after every other
    job has finished.
    """
    distributed = _require_distributed()
    token = uuid.uuid4().hex[:8]
    if keys is None:
        keys = [str(getattr(job, "key", i)) for i, job in enumerate(jobs)]
    if len(set(keys)) != len(keys):
        raise ValueError("job keys must be unique")
    fn_future = client.submit(_identity, fn, key=f"sc-{token}-fn", pure=False)
    # on every worker before the jobs start, else the scheduler would keep all jobs on the
    # worker holding it (data locality)
    distributed.wait(fn_future)
    client.replicate([fn_future])
    futures = {}
    for i, (job, key) in enumerate(zip(jobs, keys)):
        fut = client.submit(
            _call, fn_future, job, key=f"sc-{token}-{key}", retries=retries, pure=False,
            priority=len(jobs) - i,
        )  # fmt: skip
        futures[fut] = i
    failed: list[str] = []
    for fut in distributed.as_completed(list(futures)):
        i = futures[fut]
        try:
            result, where = fut.result()
        except Exception as e:  # the other jobs still finish (and are stored) first
            failed.append(f"{keys[i]!r}: {e!r}")
            continue
        yield i, result, where
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(futures)} jobs failed on the Dask cluster: " + "; ".join(failed)
        )
