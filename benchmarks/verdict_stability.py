"""Verdict stability of the demo: the same base models with the mask budget doubled.

Runs the demo configuration into ``OUT/base`` (or reuses it), then copies its trained base
models into ``OUT/double`` and reruns with ``mask.epochs`` doubled, so only the masks differ.
Prints how many run verdicts changed (acceptance: at most 1 in 10) and the per-cell counts of
base models whose usable runs are mostly compositional, for both budgets.

    python benchmarks/verdict_stability.py --out out/stability [--device cuda]

Compare two folders of other runs (CPU vs GPU, default threading vs one thread, two CPU
kernels) with ``--compare DIR_A DIR_B``: besides the raw count it recomputes every verdict
with this version's rule and reports the usable-run verdicts that differ (issue 22: at most
5%).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def _verdicts(folder: Path):
    import pandas as pd

    df = pd.read_csv(folder / "results.csv")
    key = ["init", "base_seed", "subroutine", "mask_seed"]
    return df.set_index(key)["verdict"], df


def _cells(df) -> dict:
    """Per (init, subroutine): base models whose usable runs are mostly compositional / usable
    base models."""
    out = {}
    usable = df[df["verdict"].isin(["compositional", "not compositional"])]
    for (init, sub), g in usable.groupby(["init", "subroutine"]):
        share = g.groupby("base_seed")["verdict"].apply(lambda v: (v == "compositional").mean())
        out[(init, sub)] = (int((share > 0.5).sum()), int(len(share)))
    return out


KEYS = ["task", "model", "init", "base_seed", "mask_seed", "subroutine"]


def stability(a_dir: str | Path, b_dir: str | Path) -> dict[str, float]:
    """The stability figures of two experiment folders (see the module docstring)."""
    from subroutine_circuits.analysis import inference
    from subroutine_circuits.analysis.summary import load_results, margin_of

    a = inference.run_verdicts(load_results(a_dir), margin_of(a_dir))
    b = inference.run_verdicts(load_results(b_dir), margin_of(b_dir))
    cols = [*KEYS, "verdict", "usable", "paper_compositional", "paper_usable", "n_kept"]
    m = a[cols].merge(b[cols], on=KEYS, suffixes=("_a", "_b"), validate="one_to_one")
    if len(m) != len(a) or len(m) != len(b):
        raise SystemExit(f"the runs differ: {len(a)} vs {len(b)} rows, {len(m)} matched")
    usable = m["usable_a"] | m["usable_b"]
    differ = usable & (m["verdict_a"] != m["verdict_b"])
    paper = m["paper_usable_a"] | m["paper_usable_b"]
    paper_differ = paper & (m["paper_compositional_a"] != m["paper_compositional_b"])
    return {
        "runs": len(m),
        "usable_either": int(usable.sum()),
        "verdicts_differ": int(differ.sum()),
        "share_differ": float(differ.sum() / usable.sum()) if usable.sum() else float("nan"),
        "all_verdicts_differ": int((m["verdict_a"] != m["verdict_b"]).sum()),
        "paper_usable_either": int(paper.sum()),
        "paper_differ": int(paper_differ.sum()),
        "masks_differ": int((m["n_kept_a"] != m["n_kept_b"]).sum()),
        "compositional_a": int((m["verdict_a"] == "compositional").sum()),
        "compositional_b": int((m["verdict_b"] == "compositional").sum()),
    }


def compare(a: Path, b: Path) -> None:
    """Print verdict changes (all runs, and usable runs with the verdicts recomputed by this
    version: issue 22's measure, target at most 5%) and per-cell base-model counts."""
    va, da = _verdicts(a)
    vb, db = _verdicts(b)
    common = va.index.intersection(vb.index)
    changed = int((va[common] != vb[common]).sum())
    print(f"{changed} of {len(common)} run verdicts differ ({changed / max(1, len(common)):.1%})")
    r = stability(a, b)
    print(
        f"{r['runs']} runs; usable in either: {r['usable_either']}; usable-run verdicts that "
        f"differ: {r['verdicts_differ']} ({100 * r['share_differ']:.1f}%, target <= 5%); "
        f"paper criterion differs: {r['paper_differ']} of {r['paper_usable_either']}; masks of "
        f"another size: {r['masks_differ']}; compositional {r['compositional_a']} vs "
        f"{r['compositional_b']}"
    )
    ca, cb = _cells(da), _cells(db)
    for cell in sorted(set(ca) | set(cb)):
        print(f"  {cell[0]:<12} {cell[1]:<16} {ca.get(cell)} vs {cb.get(cell)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/stability")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compare", nargs=2, metavar="DIR")
    args = ap.parse_args(argv)
    if args.compare:
        compare(Path(args.compare[0]), Path(args.compare[1]))
        return
    from subroutine_circuits.experiment.config import demo_config
    from subroutine_circuits.experiment.runner import run_experiment

    out = Path(args.out)
    cfg = demo_config()
    cfg.device, cfg.patching = args.device, False
    t = time.time()
    run_experiment(cfg, out / "base", progress=False)
    print(f"budget x1: {time.time() - t:.0f} s")
    cfg.mask.epochs *= 2
    if not (out / "double" / "models").exists():
        shutil.copytree(out / "base" / "models", out / "double" / "models")
    t = time.time()
    run_experiment(cfg, out / "double", progress=False)
    print(f"budget x2 (base models reused): {time.time() - t:.0f} s")
    compare(out / "base", out / "double")


if __name__ == "__main__":
    main()
