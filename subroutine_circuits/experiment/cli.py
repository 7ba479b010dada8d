"""CLI handlers of ``demo``, ``run``, ``report`` and ``patch``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def verdict_table(df) -> str:
    """A plain-text table: per (task, init, subroutine) how many runs show the pattern."""
    if df is None or len(df) == 0:
        return "(no finished runs)"
    ok = df[df["base_ok"].astype(bool)]
    lines = [
        f"{'task':<22} {'init':<12} {'subroutine':<18} {'comp.':>7} {'failed':>6} "
        f"{'sub_diff':>9} {'abl_diff':>9} {'randabl':>8} {'density':>8}"
    ]
    for (task, init, sub), g in ok.groupby(["task", "init", "subroutine"], sort=True):
        # compositional runs of the usable ones (search failed / excluded runs are neither)
        verdict = (
            g["verdict"]
            if "verdict" in g
            else g["compositional"].map({True: "compositional", False: "not compositional"})
        )
        usable = verdict.isin(["compositional", "not compositional"])
        n, k = int(usable.sum()), int((verdict == "compositional").sum())
        failed = int((verdict == "search failed").sum())
        lines.append(
            f"{task:<22} {init:<12} {sub:<18} {f'{k}/{n}':>7} {failed:>6} "
            f"{g['sub_diff'].mean():>9.3f} {g['abl_diff'].mean():>9.3f} "
            f"{g['randabl_diff'].mean():>8.3f} {g['density'].mean():>8.3f}"
        )
    excluded = sorted(
        set(
            df.loc[~df["base_ok"].astype(bool), "init"]
            + " s"
            + df.loc[~df["base_ok"].astype(bool), "base_seed"].astype(str)
        )
    )
    if excluded:
        lines.append(f"excluded base models (composite accuracy too low): {', '.join(excluded)}")
    return "\n".join(lines)


def _run(cfg, out: Path) -> int:
    """Run (or resume) ``cfg`` into ``out`` and print the verdict table; an interruption
    (Ctrl-C, SIGTERM from a time limit) exits with 130 after the manifest records it."""
    from subroutine_circuits.experiment.runner import run_experiment

    try:
        df = run_experiment(cfg, out, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"interrupted: finished work is in {out}; run the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    return _finish(df, out)


def _finish(df, out: Path) -> int:
    print(verdict_table(df))
    print(f"\nresults: {out / 'results.csv'}\nreport:  {out / 'report.html'}")
    return 0


def apply_executor_args(cfg, args) -> None:
    """Command-line executor settings override the config's (``--scheduler`` implies Dask);
    re-validates the config."""
    if getattr(args, "executor", None):
        cfg.executor = args.executor
    if getattr(args, "workers", None) is not None:
        cfg.workers = args.workers
    if getattr(args, "dask_workers", None) is not None:
        cfg.dask_workers = args.dask_workers
    if getattr(args, "scheduler", None):
        cfg.scheduler = args.scheduler
        if cfg.executor == "auto" or not getattr(args, "executor", None):
            cfg.executor = "dask"
    cfg.validate()


def cmd_demo(args) -> int:
    """The main job: the built-in demo experiment (``--vision``: the CNN / image demo)."""
    from subroutine_circuits.experiment.config import demo_config

    if getattr(args, "vision", False):
        from subroutine_circuits.experiment.vision import vision_demo_config

        cfg = vision_demo_config()
    else:
        cfg = demo_config()
    cfg.device = args.device
    if getattr(args, "no_patching", False):
        cfg.patching = False
    apply_executor_args(cfg, args)
    return _run(cfg, Path(args.out))


def cmd_run(args) -> int:
    """Run an experiment from a TOML config."""
    from subroutine_circuits.experiment.config import load_config

    cfg = load_config(args.config)
    if args.device != "auto":
        cfg.device = args.device
    apply_executor_args(cfg, args)
    return _run(cfg, Path(args.out))


def cmd_report(args) -> int:
    """Rebuild report.html of an experiment folder."""
    from subroutine_circuits.report import build_report

    out = Path(args.dir)
    if not (out / "results.csv").exists():
        raise FileNotFoundError(f"{out} has no results.csv: is it an experiment output folder?")
    path = build_report(out)
    print(f"report: {path}")
    return 0


def _parse_masks(specs: list[str], predicates) -> dict[str, str]:
    out = {}
    for s in specs:
        if "=" not in s:
            raise ValueError(f"--mask {s!r}: expected SUBROUTINE=PATH")
        sub, path = s.split("=", 1)
        if sub not in predicates:
            raise ValueError(f"--mask {s!r}: unknown subroutine {sub!r}; predicates: {predicates}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--mask {s!r}: no file {path}")
        out[sub] = path
    return out


def test_problems_for(task, n: int, seed: int, split_seed: int = 0) -> dict[str, list]:
    """``partition_<p>`` and ``sub_<p>`` problems, from the test split's texts when possible."""
    from subroutine_circuits.tasks import make_problems

    kinds = [f"{pre}_{p}" for p in task.predicates for pre in ("partition", "sub")]
    out = {}
    for i, kind in enumerate(kinds):
        try:
            out[kind] = make_problems(task, kind, n, seed + 7919 * i, split="test", seed=split_seed)
        except ValueError:  # e.g. a small user task whose test split lacks some combination
            out[kind] = make_problems(task, kind, n, seed + 7919 * i)
    return out


def cmd_patch(args: argparse.Namespace) -> int:
    """Run activation/attribution patching for every subroutine of TASK on MODEL_DIR and write
    ``patching.csv`` and ``frontier.csv`` (plus ``patching.json`` and per-unit
    ``scores_<sub>_<method>.pt``)."""
    import pandas as pd

    from subroutine_circuits.experiment.patching import PatchingConfig, patching_and_frontier
    from subroutine_circuits.masks import load_mask
    from subroutine_circuits.models import load_checkpoint
    from subroutine_circuits.tasks import load_task
    from subroutine_circuits.utils import atomic_write_json, atomic_write_text, resolve_device

    device = resolve_device(args.device)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model, tokenizer, meta = load_checkpoint(args.model_dir, device=device)
    if tokenizer is None:
        raise ValueError(f"checkpoint {args.model_dir} has no tokenizer (needed for the task)")
    task = load_task(args.task, rule=meta.get("rule"))
    masks = _parse_masks(args.mask, task.predicates)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = PatchingConfig(
        methods=args.methods,
        n_pairs=args.n,
        seed=args.seed,
        readout=meta.get("readout", "ooo"),
        out_dir=str(out_dir),
        split_seed=int(meta.get("split_seed", 0)),  # the model's val / test splits
    )
    test = test_problems_for(task, args.n, args.seed, int(meta.get("split_seed", 0)))
    rows, frontier = [], []
    t0 = time.time()
    for sub in task.predicates:
        mask = load_mask(masks[sub], model) if sub in masks else None
        if mask is not None:
            mask.to(device)
        found, curve = patching_and_frontier(model, tokenizer, task, sub, test, mask, cfg)
        rows += found
        frontier += curve
        print(f"patched {sub} ({time.time() - t0:.1f} s)", file=sys.stderr)
    df = pd.DataFrame(rows)
    atomic_write_text(out_dir / "patching.csv", df.to_csv(index=False))
    if frontier:
        atomic_write_text(out_dir / "frontier.csv", pd.DataFrame(frontier).to_csv(index=False))
    from subroutine_circuits.analysis.summary import AGREEMENT_CSV, agreement_frame

    agreement = agreement_frame(out_dir)  # per unit kind and layer, from the score files
    if not agreement.empty:
        atomic_write_text(out_dir / AGREEMENT_CSV, agreement.to_csv(index=False))
    atomic_write_json(
        out_dir / "patching.json",
        {
            "model_dir": str(args.model_dir),
            "task": str(args.task),
            "masks": masks,
            "config": {k: v for k, v in vars(cfg).items()},
            "device": device,
            "seconds": time.time() - t0,
        },
    )
    cols = [
        c
        for c in (
            "subroutine",
            "method",
            "k",
            "jaccard",
            "roc_auc",
            "cpr",
            "cmd",
            "abl_target_acc",
            "abl_other_acc",
        )
        if c in df
    ]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out_dir / 'patching.csv'}")
    return 0
