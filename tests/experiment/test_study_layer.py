"""The study layer: the run store's layout and resumption, typed jobs, executors."""

from __future__ import annotations

import pickle

import pytest

from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.experiment.executors import (
    InProcessExecutor,
    ProcessPoolExecutor,
    make_executor,
)
from subroutine_circuits.experiment.jobs import plan_base_model, plan_study
from subroutine_circuits.store import RunStore, base_id, run_key


def _square(x: int) -> int:
    return x * x


def test_run_store_layout_and_resumption(tmp_path):
    store = RunStore(tmp_path)
    bid = base_id("agr", "trained", 2)
    assert bid == "agr__trained__s2"
    key = run_key(bid, "subject_plural", 1)
    assert key == "agr__trained__s2__subject_plural__m1"
    assert store.mask_rel(key) == f"masks/{key}.pt"
    assert store.model_dir(bid) == tmp_path / "models" / bid
    assert not store.run_done(key)
    store.write_run(key, {"a": 1})
    assert store.run_done(key) and store.read_runs() == [{"a": 1}]
    store.write_patching_rows(bid, "subject_plural", [{"m": "activation"}])
    assert store.patching_done(bid, ["subject_plural"])
    assert not store.patching_done(bid, ["subject_plural", "verb_plural"])
    store.check_same_config({"x": 1, "workers": 1}, ("workers",))
    store.check_same_config({"x": 1, "workers": 4}, ("workers",))  # resumable field
    with pytest.raises(ValueError, match="'x' was 1, now 2"):
        store.check_same_config({"x": 2, "workers": 1}, ("workers",))
    assert pickle.loads(pickle.dumps(store)).root == store.root


def test_jobs_are_typed_keyed_and_picklable(tmp_path):
    cfg = ExperimentConfig(
        inits=["trained", "random_init"], base_seeds=[0, 1], mask_seeds=[3, 4],
        patching_inits=["trained"],
    )  # fmt: skip
    jobs = plan_study(cfg, str(tmp_path), "agr")
    assert [j.key for j in jobs] == [
        "agr__trained__s0", "agr__trained__s1", "agr__random_init__s0", "agr__random_init__s1",
    ]  # fmt: skip
    back = pickle.loads(pickle.dumps(jobs[0]))
    assert back == jobs[0] and back.key == jobs[0].key and back.cfg.mask_seeds == [3, 4]
    plan = plan_base_model(jobs[0], ["a", "b"], {"a": "b", "b": "a"})
    assert [s.key for s in plan.searches] == ["agr__trained__s0__a", "agr__trained__s0__b"]
    assert all(s.seed == 3 for s in plan.searches)
    assert [e.key for e in plan.evaluations] == [
        "agr__trained__s0__a__m3", "agr__trained__s0__a__m4",
        "agr__trained__s0__b__m3", "agr__trained__s0__b__m4",
    ]  # fmt: skip
    assert [e.other for e in plan.evaluations] == ["b", "b", "a", "a"]
    assert len(plan.patchings) == 2 and plan.patchings[0].mask_seed == 3
    assert plan_base_model(jobs[2], ["a", "b"], {"a": "b", "b": "a"}).patchings == ()


def test_executors_log_one_line_per_finished_job():
    """With a log set (a batch job without a progress bar) every executor writes one line per
    finished job, counting up, with the caller's description of the job's result."""
    from subroutine_circuits.experiment.runner import describe_job_result

    for ex in (InProcessExecutor(), ProcessPoolExecutor(2)):
        lines: list[str] = []
        ex.log = lines.append
        ex.describe_result = lambda r: f"result {r}"
        assert ex.map(_square, [3, 1, 2]) == [9, 1, 4]
        assert len(lines) == 3
        assert [ln.split("job ")[1].split(" ")[0] for ln in lines] == ["1/3", "2/3", "3/3"]
        assert sorted(ln.rsplit("result ", 1)[1] for ln in lines) == ["1", "4", "9"]
    info = {"base_id": "trained_s0", "composite_val_acc": 0.9712, "base_model": 12.3,
            "masks": 40.0, "patching": 5.5, "total": 57.8}  # fmt: skip
    text = describe_job_result(info)
    assert text.startswith("trained_s0 (val composite 0.971;")
    assert "masks 40 s" in text and "total 58 s" in text


def test_executors_agree_and_keep_job_order():
    jobs = [3, 1, 2]
    assert InProcessExecutor().map(_square, jobs) == [9, 1, 4]
    assert ProcessPoolExecutor(2).map(_square, jobs) == [9, 1, 4]
    assert isinstance(make_executor("auto", 1), InProcessExecutor)
    assert isinstance(make_executor("auto", 3), ProcessPoolExecutor)
    with pytest.raises(ValueError, match="unknown executor 'dusk'"):
        make_executor("dusk")


def _sleep_then_return(x):
    """A slow job (worker side) for the interruption test."""
    import time

    time.sleep(x)
    return x


def test_an_interrupted_process_pool_leaves_no_worker_running():
    """KeyboardInterrupt (Ctrl-C, or SIGTERM through the runner) in the middle of a map stops
    the worker processes too, instead of leaving them to finish their jobs as orphans."""
    import multiprocessing as mp
    import signal
    import time

    def interrupt(signum, frame):
        raise KeyboardInterrupt("test")

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(4)  # long enough for the spawned workers to start their first job
    t0 = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            ProcessPoolExecutor(2).map(_sleep_then_return, [60, 60, 60, 60])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    # the jobs take 60 s each: returning long before that means the workers were stopped, not
    # waited for (this is a bound on a hang, not a speed measurement)
    assert time.time() - t0 < 40
    deadline = time.time() + 10
    while mp.active_children() and time.time() < deadline:
        time.sleep(0.1)
    assert not mp.active_children(), "worker processes still running after the interruption"
