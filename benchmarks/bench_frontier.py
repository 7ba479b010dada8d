"""What the frontier (issue 23) adds to a base model's patching stage.

    python benchmarks/bench_frontier.py DEMO_OUT

``DEMO_OUT``: a finished ``subroutine-circuits demo --out DEMO_OUT`` folder. Runs the patching
stage of its trained seed-0 base model (both subroutines, one torch thread) without and with
the frontier, alternated twice in this process, and prints the seconds and their ratio.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace


def main(out: str) -> None:
    import torch

    from subroutine_circuits.experiment import config_from_dict
    from subroutine_circuits.experiment.data import prepare
    from subroutine_circuits.experiment.jobs import BaseModelJob, plan_base_model
    from subroutine_circuits.experiment.stages import base_model_stage, patching_stage
    from subroutine_circuits.models.cpu_kernels import fast_cpu_attention
    from subroutine_circuits.store import RunStore

    torch.set_num_threads(1)
    cfg = config_from_dict(json.loads((RunStore(out).root / "config.json").read_text()))
    prep = prepare(cfg)
    store = RunStore(out)
    job = BaseModelJob(cfg, out, prep.label, "trained", 0)
    subs = prep.subroutines
    others = {s: next(o for o in subs if o != s) for s in subs}
    times: dict[bool, list[float]] = {False: [], True: []}
    with fast_cpu_attention():
        base = base_model_stage(job, prep, store)
        for frontier in (False, True, False, True):
            c2 = replace(cfg, patching_options=replace(cfg.patching_options, frontier=frontier))
            t = time.perf_counter()
            for p in plan_base_model(job, subs, others).patchings:
                patching_stage(p, c2, prep, base, store)
            times[frontier].append(time.perf_counter() - t)
    plain, with_frontier = min(times[False]), min(times[True])
    print(f"patching stage: plain {plain:.2f} s, with the frontier {with_frontier:.2f} s, "
          f"ratio {with_frontier / plain:.2f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
