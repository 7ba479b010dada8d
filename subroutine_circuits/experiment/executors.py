"""Executors: run a list of jobs with one interface, in this process or in worker processes.

An executor maps a picklable function over picklable jobs and returns the results in job
order; jobs are started in the order given (the runner puts the longest first). After ``map``,
:meth:`Executor.describe` names the executor and its workers and :attr:`Executor.placements`
says where each job ran (worker name, its device), for the manifest. :class:`DaskExecutor` runs
them on a Dask cluster (a local one with one worker per GPU, or an existing one), see
:mod:`subroutine_circuits.experiment.dask_executor`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any


class Executor(ABC):
    """Runs ``fn(job)`` for every job; results come back in job order."""

    name: str = "abstract"

    def __init__(self) -> None:
        self.placements: list[dict[str, str]] = []  # per job of the last map: worker, device
        self.finished: dict[int, Any] = {}  # job index -> result, filled as jobs end
        #: Called with one line per finished job (``None``: silent), e.g. for a batch job's log
        #: where no progress bar is drawn; :attr:`describe_result` formats the job's result.
        self.log: Callable[[str], None] | None = None
        self.describe_result: Callable[[Any], str] = lambda result: ""
        self._t0 = 0.0

    def _start(self, n_jobs: int) -> None:
        """Reset the per-map records (:attr:`placements`, :attr:`finished`)."""
        import time

        self.placements = [{} for _ in range(n_jobs)]
        self.finished = {}
        self._t0 = time.perf_counter()

    def _record(self, i: int, result: Any, where: dict[str, str]) -> None:
        """Job ``i`` finished with ``result`` on ``where`` (kept if the map is interrupted)."""
        import time

        self.finished[i] = result
        self.placements[i] = where
        if self.log is not None:
            elapsed = time.perf_counter() - self._t0
            done, n = len(self.finished), len(self.placements)
            line = f"[{elapsed:7.1f} s] job {done}/{n} done on {where.get('worker', '?')}"
            extra = self.describe_result(result)
            self.log(f"{line}: {extra}" if extra else line)

    def describe(self) -> dict[str, Any]:
        """``{"name", "workers"}`` (plus executor-specific entries); where each job of the last
        ``map`` ran is in :attr:`placements`."""
        return {"name": self.name, "workers": getattr(self, "workers", 1)}

    @abstractmethod
    def map(
        self,
        fn: Callable[[Any], Any],
        jobs: Sequence[Any],
        progress: bool = False,
        desc: str = "jobs",
    ) -> list[Any]:
        """``[fn(job) for job in jobs]``, however the executor schedules them."""


class InProcessExecutor(Executor):
    """One job after the other in this process."""

    name = "inprocess"

    def map(self, fn, jobs, progress=False, desc="jobs"):
        from tqdm.auto import tqdm

        from subroutine_circuits.experiment.dask_executor import worker_identity

        jobs = list(jobs)
        self._start(len(jobs))
        where = {**worker_identity(), "worker": "main"}
        for i, job in enumerate(tqdm(jobs, disable=not progress, desc=desc)):
            self._record(i, fn(job), where)
        return [self.finished[i] for i in range(len(jobs))]


def _call_with_threads(args: tuple[Callable[[Any], Any], Any, int]) -> Any:
    """Worker entry: limit torch's threads, then run one job; returns (result, identity)."""
    fn, job, threads = args
    import torch

    from subroutine_circuits.experiment.dask_executor import worker_identity

    torch.set_num_threads(threads)
    return fn(job), worker_identity()


def gpu_assignment(index: int, workers: int, visible: Sequence[str]) -> dict[str, str]:
    """Environment of process-pool worker ``index`` of ``workers`` on a machine whose visible
    GPUs are ``visible`` (``CUDA_VISIBLE_DEVICES`` entries): pinned round-robin to GPU
    ``index % len(visible)``, and told how many workers share it (``SC_WORKERS_PER_GPU``, which
    sizes its memory budget, see :mod:`subroutine_circuits.memory`). Empty without GPUs."""
    from subroutine_circuits.experiment.dask_executor import WORKERS_PER_GPU_ENV

    if not visible:
        return {}
    gpu = index % len(visible)
    sharing = len(range(gpu, max(workers, gpu + 1), len(visible)))
    return {"CUDA_VISIBLE_DEVICES": str(visible[gpu]), WORKERS_PER_GPU_ENV: str(sharing)}


def _visible_gpus() -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of this process's GPUs (indices when unset)."""
    import os

    from subroutine_circuits.experiment.dask_executor import count_gpus

    n = count_gpus()
    listed = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    listed = [v for v in listed if v]
    return listed[:n] if len(listed) >= n else [str(i) for i in range(n)]


def _init_worker(counter: Any, workers: int, visible: list[str]) -> None:
    """Process-pool worker start: take the next worker index and pin this process to its GPU
    (before CUDA is initialised here)."""
    import os

    with counter.get_lock():
        index = int(counter.value)
        counter.value += 1
    os.environ.update(gpu_assignment(index, workers, visible))


def _stop_workers(pool: Any) -> None:
    """Cancel the jobs not started and terminate the worker processes of a
    ``concurrent.futures`` process pool, so an interrupted map returns at once instead of
    waiting for (or orphaning) the running jobs; finished jobs are already recorded."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)


class ProcessPoolExecutor(Executor):
    """Jobs in ``workers`` spawned processes, each with ``threads`` torch threads.

    For tiny models one process per core with one thread each is much faster than one process
    with several threads. Falls back to in-process execution for a single job. On a machine
    with GPUs, worker ``i`` is pinned to GPU ``i % n_gpus`` and knows how many workers share
    its GPU (:func:`gpu_assignment`), so that several workers on one GPU each keep to their
    share of its memory.
    """

    name = "processes"

    def __init__(self, workers: int, threads: int = 1):
        super().__init__()
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.threads = int(threads)

    def map(self, fn, jobs, progress=False, desc="jobs"):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor as _Pool
        from concurrent.futures import as_completed

        from tqdm.auto import tqdm

        jobs = list(jobs)
        if len(jobs) <= 1 or self.workers == 1:
            inproc = InProcessExecutor()
            try:
                return inproc.map(fn, jobs, progress, desc)
            finally:
                self.placements, self.finished = inproc.placements, inproc.finished
        self._start(len(jobs))
        results: list[Any] = [None] * len(jobs)
        ctx = mp.get_context("spawn")
        counter = ctx.Value("i", 0)
        init = (counter, self.workers, _visible_gpus())
        with _Pool(
            max_workers=self.workers, mp_context=ctx, initializer=_init_worker, initargs=init
        ) as pool:
            futures = {
                pool.submit(_call_with_threads, (fn, job, self.threads)): i
                for i, job in enumerate(jobs)
            }
            try:
                for fut in tqdm(
                    as_completed(futures), total=len(futures), disable=not progress, desc=desc
                ):
                    results[futures[fut]], where = fut.result()
                    self._record(futures[fut], results[futures[fut]], where)
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM via the runner
                _stop_workers(pool)  # (a failed job instead lets the running ones finish)
                raise
        return results


class DaskExecutor(Executor):
    """Jobs on a Dask cluster: a local one started here, or ``scheduler`` (an address).

    The local cluster has one worker per GPU, each pinned to its device (``workers`` > number of
    GPUs: workers share GPUs round-robin), or ``workers`` CPU workers without GPUs (default: one
    per core, at most 4). A job whose worker dies is re-run elsewhere; a job that raises is
    retried ``retries`` times; the others always finish before a failure is raised. Needs the
    ``dask`` extra.
    """

    name = "dask"

    def __init__(
        self,
        workers: int | None = None,
        scheduler: str | None = None,
        retries: int = 2,
        cpu_workers: int = 0,
    ):
        super().__init__()
        if workers is not None and workers < 1:
            raise ValueError(f"dask workers must be >= 1, got {workers}")
        self.n_workers = workers
        self.scheduler = scheduler
        self.retries = int(retries)
        self.cpu_workers = int(cpu_workers)
        self.workers: int | None = workers
        self.seconds: dict[str, float] = {}

    def describe(self) -> dict[str, Any]:
        """The base description plus the scheduler address and the cluster start-up time."""
        return {**super().describe(), "scheduler": self.scheduler, **self.seconds}

    def map(self, fn, jobs, progress=False, desc="jobs"):
        import time

        from tqdm.auto import tqdm

        from subroutine_circuits.experiment.dask_executor import dask_client, map_jobs

        jobs = list(jobs)
        results: list[Any] = [None] * len(jobs)
        self._start(len(jobs))
        if not jobs:
            return results
        t0 = time.perf_counter()
        with dask_client(self.scheduler, self.n_workers, cpu_workers=self.cpu_workers) as client:
            self.seconds["cluster_start_s"] = time.perf_counter() - t0
            self.workers = len(client.scheduler_info(n_workers=-1)["workers"])
            bar = tqdm(total=len(jobs), disable=not progress, desc=desc)
            for i, result, where in map_jobs(client, fn, jobs, retries=self.retries):
                results[i] = result
                self._record(i, result, where)
                bar.update()
            bar.close()
        return results


#: Executor classes by name (``ExperimentConfig.executor``).
EXECUTORS: dict[str, Callable[..., Executor]] = {
    "inprocess": lambda workers=1, **_: InProcessExecutor(),
    "processes": lambda workers=1, **_: ProcessPoolExecutor(workers),
    "dask": lambda workers=1, dask_workers=None, scheduler=None, **_: DaskExecutor(
        dask_workers, scheduler
    ),
}


def make_executor(
    name: str = "auto",
    workers: int = 1,
    dask_workers: int | None = None,
    scheduler: str | None = None,
) -> Executor:
    """An executor by name. ``"auto"``: Dask if a ``scheduler`` address is given, else worker
    processes if ``workers > 1``, else in-process. ``dask_workers`` / ``scheduler`` configure
    the Dask executor (local cluster size / an existing cluster).

    Raises:
        ValueError: naming an unknown executor, or a scheduler given to a non-Dask executor.
    """
    if name == "auto":
        name = "dask" if scheduler else ("processes" if workers > 1 else "inprocess")
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose 'auto' or one of {sorted(EXECUTORS)}")
    if scheduler and name != "dask":
        raise ValueError(f"a Dask scheduler address was given but the executor is {name!r}")
    return EXECUTORS[name](workers=workers, dask_workers=dask_workers, scheduler=scheduler)
