"""Verdict stability of the demo: the same base models with the mask budget doubled.

Runs the demo configuration into ``OUT/base`` (or reuses it), then copies its trained base
models into ``OUT/double`` and reruns with ``mask.epochs`` doubled, so only the masks differ.
Prints how many run verdicts changed (acceptance: at most 1 in 10) and the per-cell counts of
base models whose usable runs are mostly compositional, for both budgets.

    python benchmarks/verdict_stability.py --out out/stability [--device cuda]

Compare two folders of other runs (CPU vs GPU, default threading vs one thread) with
``--compare DIR_A DIR_B``.
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


def compare(a: Path, b: Path) -> None:
    """Print verdict changes and per-cell base-model counts of two experiment folders."""
    va, da = _verdicts(a)
    vb, db = _verdicts(b)
    common = va.index.intersection(vb.index)
    changed = int((va[common] != vb[common]).sum())
    print(f"{changed} of {len(common)} run verdicts differ ({changed / max(1, len(common)):.1%})")
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
