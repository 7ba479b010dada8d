"""Executors: run a list of jobs with one interface, in this process or in worker processes.

An executor maps a picklable function over picklable jobs and returns the results in job
order. A distributed executor (Dask: submit every job, gather the results) is one more class
with the same ``map`` method, registered in :data:`EXECUTORS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any


class Executor(ABC):
    """Runs ``fn(job)`` for every job; results come back in job order."""

    name: str = "abstract"

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

        return [fn(job) for job in tqdm(list(jobs), disable=not progress, desc=desc)]


def _call_with_threads(args: tuple[Callable[[Any], Any], Any, int]) -> Any:
    """Worker entry: limit torch's threads, then run one job."""
    fn, job, threads = args
    import torch

    torch.set_num_threads(threads)
    return fn(job)


class ProcessPoolExecutor(Executor):
    """Jobs in ``workers`` spawned processes, each with ``threads`` torch threads.

    For tiny models one process per core with one thread each is much faster than one process
    with several threads. Falls back to in-process execution for a single job.
    """

    name = "processes"

    def __init__(self, workers: int, threads: int = 1):
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
            return InProcessExecutor().map(fn, jobs, progress, desc)
        results: list[Any] = [None] * len(jobs)
        ctx = mp.get_context("spawn")
        with _Pool(max_workers=self.workers, mp_context=ctx) as pool:
            futures = {
                pool.submit(_call_with_threads, (fn, job, self.threads)): i
                for i, job in enumerate(jobs)
            }
            for fut in tqdm(
                as_completed(futures), total=len(futures), disable=not progress, desc=desc
            ):
                results[futures[fut]] = fut.result()
        return results


#: Executor classes by name (``ExperimentConfig.executor``).
EXECUTORS: dict[str, Callable[..., Executor]] = {
    "inprocess": lambda workers=1: InProcessExecutor(),
    "processes": lambda workers=1: ProcessPoolExecutor(workers),
}


def make_executor(name: str = "auto", workers: int = 1) -> Executor:
    """An executor by name; ``"auto"``: worker processes if ``workers > 1``, else in-process.

    Raises:
        ValueError: naming an unknown executor.
    """
    if name == "auto":
        name = "processes" if workers > 1 else "inprocess"
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose 'auto' or one of {sorted(EXECUTORS)}")
    return EXECUTORS[name](workers=workers)
