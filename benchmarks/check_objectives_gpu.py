"""Check: the prompt-pair verbs (issue 24) on an accelerator, against the same runs on the CPU.

On the planted logit-difference model (``groundtruth/planted_pairs.py``) and on a built-in tiny
causal model pretrained on the agreement corpus, runs ``compare_circuits`` (mask search under
logit difference, activation and attribution patching, frontier, random controls) on the
device and prints, per model: seconds, the mask's size, ROC AUC of the mask and of the patching
scores against the planted units, CPR per ranking and the faithfulness of the mask alone and
removed. Writes the numbers as JSON to ``--out``.

    python benchmarks/check_objectives_gpu.py --device cuda --out objectives_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(device: str) -> dict:
    """Both models on ``device``; returns the figures."""
    from subroutine_circuits import (
        build_model,
        compare_circuits,
        get_task,
        pretrain_model,
        prompt_pairs,
    )
    from subroutine_circuits.experiment.patching import mask_unit_params
    from subroutine_circuits.groundtruth.planted_pairs import build_planted_pairs
    from subroutine_circuits.patching.compare import roc_auc

    out: dict = {"device": device}
    planted = build_planted_pairs(seed=0)
    planted.model.to(device)
    t0 = time.perf_counter()
    res = compare_circuits(planted.model, planted.pairs.to(device), seed=0)
    truth = planted.truth
    out["planted"] = {
        "seconds": time.perf_counter() - t0,
        "k": int(res.mask.flat_binary().sum()),
        "n_planted": int(truth.sum()),
        "auc_mask": roc_auc(mask_unit_params(res.mask), truth),
        **{f"auc_{m}": roc_auc(s.abs(), truth) for m, s in res.scores.items()},
        "cpr": {r["method"]: r["cpr"] for r in res.summary},
        "faithfulness": res.ablation["faithfulness"],
        "removed_faithfulness": res.ablation["removed_faithfulness"],
    }
    task = get_task("agreement_singular")
    model = build_model(task, preset="tiny", seed=0, device=device)
    t0 = time.perf_counter()
    pretrain_model(model, task, steps=600, seed=0)
    pairs = prompt_pairs(model, task.prompt_pairs(160, seed=1))
    res = compare_circuits(model, pairs, seed=0)
    out["pretrained_tiny"] = {
        "seconds": time.perf_counter() - t0,
        "k": int(res.mask.flat_binary().sum()),
        "n_units": res.ablation["n_units"],
        "cpr": {r["method"]: r["cpr"] for r in res.summary},
        "faithfulness": res.ablation["faithfulness"],
        "removed_faithfulness": res.ablation["removed_faithfulness"],
        "p_sufficient": res.ablation["p_sufficient"],
        "p_necessary": res.ablation["p_necessary"],
    }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    out = run(args.device)
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
