"""The Dask executor: same results as in-process, retried jobs after a worker dies, resumption,
worker pinning, and the manifest's per-invocation timings.

One local CPU cluster (2 workers, started by ``dask_client`` as the executor does) is shared by
the tests through its scheduler address (the ``--scheduler`` path), so that the workers import
torch and TransformerLens once; one test lets the executor start (and stop) its own cluster.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (ships with distributed)

from subroutine_circuits.experiment import config_from_dict, run_experiment  # noqa: E402
from subroutine_circuits.experiment.dask_executor import (  # noqa: E402
    DEVICE_ENV,
    dask_client,
    worker_device,
    worker_specs,
)
from subroutine_circuits.experiment.executors import DaskExecutor, make_executor  # noqa: E402
from subroutine_circuits.experiment.timing import (  # noqa: E402
    accumulate,
    collect_stage_times,
    stage,
    sum_stage_times,
)

# the worker processes unpickle this module's functions by value (no import of the test file)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _square(x: int) -> int:
    return x * x


def _die_once(job: tuple[str, int]) -> int:
    """Kill the worker process the first time any job runs (marker file), then square."""
    marker, x = job
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)  # the worker process dies mid-job, as on a crash or an OOM kill
    return x * x


def _fail_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("two is not allowed")
    return x


@pytest.fixture(scope="module")
def scheduler():
    """Address of a local 2-worker CPU cluster shared by this module's generic tests."""
    with dask_client(n_workers=2, n_gpus=0, threads=1) as client:
        yield client.scheduler.address


def test_dask_executor_keeps_job_order_and_reports_workers(scheduler):
    ex = DaskExecutor(scheduler=scheduler)
    assert ex.map(_square, [3, 1, 2, 5]) == [9, 1, 4, 25]
    assert ex.workers == 2
    assert len(ex.placements) == 4
    assert {p["device"] for p in ex.placements} == {"cpu"}
    assert {p["worker"] for p in ex.placements} <= {"cpu-w0", "cpu-w1"}
    assert ex.describe()["name"] == "dask" and ex.describe()["scheduler"] == scheduler
    assert isinstance(make_executor("auto", scheduler=scheduler), DaskExecutor)
    with pytest.raises(ValueError, match="scheduler address was given"):
        make_executor("processes", 2, scheduler=scheduler)


def test_executor_starts_and_stops_its_own_local_cluster():
    ex = make_executor("dask", dask_workers=1)
    assert ex.map(_square, [2, 3]) == [4, 9]
    described = ex.describe()
    assert described["workers"] == 1 and described["cluster_start_s"] > 0
    assert [p["worker"] for p in ex.placements] == ["cpu-w0", "cpu-w0"]


def test_a_job_whose_worker_dies_is_retried_and_the_sweep_completes(scheduler, tmp_path):
    marker = str(tmp_path / "died")
    jobs = [(marker, i) for i in range(6)]
    out = DaskExecutor(scheduler=scheduler).map(_die_once, jobs)
    assert out == [i * i for i in range(6)]
    assert os.path.exists(marker)  # a worker really died (its pid is in the file)
    assert int(open(marker).read()) != os.getpid()


def test_a_failing_job_is_named_after_the_others_finish(scheduler):
    with pytest.raises(RuntimeError, match=r"1 of 4 jobs failed.*two is not allowed"):
        DaskExecutor(scheduler=scheduler, retries=0).map(_fail_on_two, [0, 1, 2, 3])


def test_worker_specs_pin_gpus_round_robin_and_hide_them_from_cpu_workers():
    specs = worker_specs(n_gpus=2, n_workers=3, cpu_workers=1, threads=2)
    envs = {name: s["options"]["env"] for name, s in specs.items()}
    assert list(envs) == ["gpu0-w0", "gpu1-w1", "gpu0-w2", "cpu-w0"]
    assert [envs[n]["CUDA_VISIBLE_DEVICES"] for n in envs] == ["0", "1", "0", ""]
    assert [envs[n][DEVICE_ENV] for n in envs] == ["cuda", "cuda", "cuda", "cpu"]
    assert all(e["OMP_NUM_THREADS"] == "2" for e in envs.values())
    assert all(s["options"]["nthreads"] == 1 for s in specs.values())  # one job at a time
    cpu = worker_specs(n_gpus=0, n_workers=3)
    assert list(cpu) == ["cpu-w0", "cpu-w1", "cpu-w2"]
    assert len(worker_specs(n_gpus=1)) == 1  # default: one worker per GPU
    with pytest.raises(ValueError, match="n_workers must be >= 1"):
        worker_specs(n_gpus=1, n_workers=0)


def test_worker_device_follows_the_worker_unless_the_config_names_one(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert worker_device("auto") == "cpu"
    assert worker_device("cpu") == "cpu"
    monkeypatch.delenv(DEVICE_ENV)
    import torch

    assert worker_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_stage_times_nest_sum_and_accumulate():
    with collect_stage_times() as outer:
        with stage("mask_search"):
            pass
        with collect_stage_times() as inner:
            with stage("evaluation"):
                pass
        with stage("mask_search"):
            pass
    assert set(outer) == {"mask_search"} and set(inner) == {"evaluation"}
    with stage("nowhere"):  # outside a collection: no effect, no error
        pass
    total = sum_stage_times([{"mask_search": 1.0, "evaluation": 2.0}, {"mask_search": 0.5}])
    assert total["mask_search_s"] == 1.5 and total["evaluation_s"] == 2.0
    assert total["base_model_s"] == 0.0 and total["patching_s"] == 0.0
    run1 = accumulate({}, {"wall_s": 10.0, "mask_search_s": 4.0})
    run2 = accumulate(run1, {"wall_s": 5.0, "mask_search_s": 1.0, "patching_s": 2.0})
    assert run2 == {"wall_s": 15.0, "mask_search_s": 5.0, "patching_s": 2.0, "invocations": 2}


def _study(**extra) -> dict:
    """Two tasks in one study, a trained base model each, two mask seeds: seconds each."""
    cfg = {
        "task": ["agreement_singular", "anaphora_singular"],
        "inits": ["trained"],
        "base_seeds": [0],
        "mask_seeds": [0, 1],
        "min_composite_acc": 0.0,
        "patching": False,
        "data": {"n_train": 48, "n_val": 24, "n_test": 24, "corpus_size": 100},
        "train": {"max_steps": 20, "eval_every": 10},
        "mask": {"steps": 20, "lr": 0.1, "init": 1.0, "grid": [{"l0_weight": 4.0}]},
        "device": "cpu",
    }
    return {**cfg, **extra}


VERDICT_COLUMNS = ["task", "init", "base_seed", "mask_seed", "subroutine", "compositional"]


def _numbers(df):
    return df.select_dtypes("number")


def test_dask_study_equals_inprocess_and_resumes(tmp_path, scheduler, monkeypatch):
    """results.csv of a two-task sweep on a local 2-worker Dask cluster equals the in-process
    one; a sweep interrupted after some runs resumes with only the missing runs computed; the
    manifest sums both invocations. (The HTML report is not under test here: skipped.)"""
    import pandas as pd

    import subroutine_circuits.report

    monkeypatch.setattr(subroutine_circuits.report, "build_report", lambda out: None)
    ref = run_experiment(config_from_dict(_study()), tmp_path / "ref", progress=False)
    out = tmp_path / "dask"
    dask_cfg = config_from_dict(_study(executor="dask", scheduler=scheduler))
    got = run_experiment(dask_cfg, out, progress=False)
    assert len(ref) == len(got) == 8
    assert sorted(got["task"].unique()) == ["agreement_singular", "anaphora_singular"]
    pd.testing.assert_frame_equal(ref[VERDICT_COLUMNS], got[VERDICT_COLUMNS])
    pd.testing.assert_frame_equal(_numbers(ref), _numbers(got), check_exact=False, atol=1e-9)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["executor"]["name"] == "dask" and manifest["executor"]["workers"] == 2
    per_worker = manifest["executor"]["per_worker"]
    assert sum(w["jobs"] for w in per_worker.values()) == 2
    assert {w["device"] for w in per_worker.values()} == {"cpu"}

    # interrupt: lose two runs (and the tables), then resume on the shared cluster
    runs = sorted((out / "runs").glob("*.json"))
    kept = {p.name: p.stat().st_mtime_ns for p in runs[2:]}
    for p in runs[:2]:
        p.unlink()
    again = run_experiment(dask_cfg, out, progress=False)
    pd.testing.assert_frame_equal(_numbers(got), _numbers(again), check_exact=False, atol=1e-9)
    assert {p.name: p.stat().st_mtime_ns for p in runs[2:]} == kept  # not recomputed
    manifest = json.loads((out / "manifest.json").read_text())
    inv, total = manifest["invocations"], manifest["timings_total"]
    assert len(inv) == 2 and total["invocations"] == 2
    for key in ("wall_s", "base_model_s", "mask_search_s", "evaluation_s", "summary_s"):
        assert total[key] == pytest.approx(inv[0][key] + inv[1][key]), key
    assert inv[0]["mask_search_s"] > 0 and inv[1]["evaluation_s"] > 0
    # a partly finished base model retrains its masks (deterministic) and writes only the
    # missing runs (experiment.verdicts.run_masks_stage), so the resume may search again
    assert manifest["timings"]["wall_s"] == pytest.approx(inv[1]["wall_s"])


def test_cli_executor_flags_override_the_config():
    from subroutine_circuits.cli import build_parser
    from subroutine_circuits.experiment.cli import apply_executor_args

    def apply(*flags, **cfg_extra):
        cfg = config_from_dict({"executor": "inprocess", **cfg_extra})
        apply_executor_args(cfg, build_parser().parse_args(["run", "x.toml", "--out", "o", *flags]))
        return cfg

    cfg = apply("--executor", "dask", "--dask-workers", "3")
    assert (cfg.executor, cfg.dask_workers, cfg.scheduler) == ("dask", 3, None)
    cfg = apply("--scheduler", "tcp://h:8786")  # implies dask
    assert (cfg.executor, cfg.scheduler) == ("dask", "tcp://h:8786")
    assert apply().executor == "inprocess"  # no flags: the config's
    assert apply("--workers", "2", "--executor", "processes").workers == 2
    with pytest.raises(ValueError, match="scheduler is set but executor is 'processes'"):
        apply("--scheduler", "tcp://h:8786", "--executor", "processes")


STUDY_TOML = """
task = "agreement_singular"
inits = ["trained", "random_init"]
base_seeds = [0]
mask_seeds = [0, 1]
min_composite_acc = 0.0
patching = false
device = "cpu"
executor = "inprocess"
[data]
n_train = 48
n_val = 24
n_test = 24
corpus_size = 100
[train]
max_steps = 20
eval_every = 10
[mask]
steps = 20
lr = 0.1
init = 1.0
grid = [{ l0_weight = 4.0 }]
"""


def test_a_sweep_stopped_by_a_time_limit_records_its_time_and_resumes(tmp_path, monkeypatch):
    """SIGTERM (what ``timeout`` sends) stops ``run`` with exit code 130 after the manifest
    records the interrupted invocation; running again finishes the sweep and the manifest sums
    both invocations."""
    import signal
    import subprocess
    import time as _time
    from pathlib import Path

    import subroutine_circuits.report
    from subroutine_circuits.experiment import load_config

    config, out = tmp_path / "study.toml", tmp_path / "out"
    config.write_text(STUDY_TOML)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}  # as in conftest
    proc = subprocess.Popen(
        [sys.executable, "-m", "subroutine_circuits", "run", str(config), "--out", str(out)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    second = out / "models" / "agreement_singular__random_init__s0" / "meta.json"
    deadline = _time.time() + 300
    while not second.exists() and proc.poll() is None and _time.time() < deadline:
        _time.sleep(0.2)  # the first (trained) base model is done once the second one exists
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err
    first = json.loads((out / "manifest.json").read_text())["invocations"]
    assert len(first) == 1 and first[0]["interrupted"] is True
    assert first[0]["base_model_s"] > 0 and first[0]["mask_search_s"] > 0  # the finished job
    assert not (out / "results.csv").exists()

    monkeypatch.setattr(subroutine_circuits.report, "build_report", lambda out: None)
    df = run_experiment(load_config(config), out, progress=False)
    assert len(df) == 8
    manifest = json.loads((out / "manifest.json").read_text())
    inv, total = manifest["invocations"], manifest["timings_total"]
    assert len(inv) == 2 and "interrupted" not in inv[1]
    assert total["wall_s"] == pytest.approx(inv[0]["wall_s"] + inv[1]["wall_s"])
    assert total["invocations"] == 2
