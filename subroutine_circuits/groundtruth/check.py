"""Quick end-to-end check: masks from the existing engine on planted models, scored against
the truth. ``python -m subroutine_circuits.groundtruth.check --seeds 0 1`` prints one line per
(model, subroutine, mask seed) and the build / search times.

Uses ``experiment.search.search_mask`` with the default ``MaskSearchConfig`` (nothing tuned
here) on the planted model's ``sub_<p>`` training problems (grid chosen on validation problems),
then ``experiment.evaluate.ablation_matrix`` on the test partitions for the verdict.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def check_model(planted: Any, mask_seeds=(0,), ablation: str = "mean") -> list[dict[str, Any]]:
    """Rows (``scoring.mask_row`` plus verdict and timings) for each subroutine and mask seed."""
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.evaluate import ablation_matrix
    from subroutine_circuits.experiment.search import encode, search_mask
    from subroutine_circuits.groundtruth.scoring import mask_row

    model, tok, splits = planted.model, planted.tokenizer, planted.splits
    cfg = MaskSearchConfig()
    preds = list(planted.subroutines)
    test = {k: encode(v, tok) for k, v in splits["test"].items() if v}
    rows = []
    for sub in preds:
        other = preds[1 - preds.index(sub)]
        train = encode(splits["train"][f"sub_{sub}"], tok)
        val = encode(splits["val"][f"sub_{sub}"], tok)
        for ms in mask_seeds:
            t0 = time.perf_counter()
            _, log, mask = search_mask(model, train, val, cfg, ms, "last")
            t_search = time.perf_counter() - t0
            res = ablation_matrix(
                model, mask, test, sub, other, "last", ms,
                reference=encode(splits["val"][f"sub_{sub}"], tok), ablation=ablation,
            )  # fmt: skip
            row = mask_row(planted, sub, mask, verdict=bool(res["compositional"]))
            row.update(
                mask_seed=ms,
                val_acc=max(e["val_acc"] for e in log),
                sub_diff=res["sub_diff"],
                abl_diff=res["abl_diff"],
                search_seconds=t_search,
            )
            rows.append(row)
    return rows


def main(argv=None) -> None:
    """CLI entry: build planted models and print the check rows."""
    import torch

    from subroutine_circuits.groundtruth.planted import KINDS, build_planted

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--mask-seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for seed in args.seeds:
        for kind in args.kinds:
            t0 = time.perf_counter()
            planted = build_planted(kind, seed)
            built = time.perf_counter() - t0
            j = planted.metrics["joined"]
            print(
                f"{kind} seed {seed}: built in {built:.1f}s, units {len(planted.units())}, "
                f"truth {planted.summary()['truth_sizes']}, composite val acc "
                f"{j['full_composite']:.3f}, all-ablated {j['none_composite']:.3f}",
                flush=True,
            )
            for r in check_model(planted, args.mask_seeds):
                print(
                    f"  {r['subroutine']:>16} mask_seed {r['mask_seed']} auc {r['roc_auc']:.3f} "
                    f"prec {r['precision']:.3f} rec {r['recall']:.3f} kept {r['n_kept']}/"
                    f"{r['n_units']} val {r['val_acc']:.3f} sub_diff {r['sub_diff']:+.3f} "
                    f"abl_diff {r['abl_diff']:+.3f} verdict {r['verdict']} "
                    f"({r['search_seconds']:.1f}s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
