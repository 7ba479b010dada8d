"""CLI handlers of ``demo``, ``run`` and ``report``."""

from __future__ import annotations

import sys
from pathlib import Path


def verdict_table(df) -> str:
    """A plain-text table: per (task, init, subroutine) how many runs show the pattern."""
    if df is None or len(df) == 0:
        return "(no finished runs)"
    ok = df[df["base_ok"].astype(bool)]
    lines = [
        f"{'task':<22} {'init':<12} {'subroutine':<18} {'comp.':>7} "
        f"{'sub_diff':>9} {'abl_diff':>9} {'randabl':>8} {'density':>8}"
    ]
    for (task, init, sub), g in ok.groupby(["task", "init", "subroutine"], sort=True):
        n, k = len(g), int(g["compositional"].astype(bool).sum())
        lines.append(
            f"{task:<22} {init:<12} {sub:<18} {f'{k}/{n}':>7} {g['sub_diff'].mean():>9.3f} "
            f"{g['abl_diff'].mean():>9.3f} {g['randabl_diff'].mean():>8.3f} "
            f"{g['density'].mean():>8.3f}"
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


def _finish(df, out: Path) -> int:
    print(verdict_table(df))
    print(f"\nresults: {out / 'results.csv'}\nreport:  {out / 'report.html'}")
    return 0


def cmd_demo(args) -> int:
    """The main job: the built-in demo experiment."""
    from subroutine_circuits.experiment.config import demo_config
    from subroutine_circuits.experiment.runner import run_experiment

    cfg = demo_config()
    cfg.device = args.device
    if getattr(args, "no_patching", False):
        cfg.patching = False
    out = Path(args.out)
    return _finish(run_experiment(cfg, out, progress=sys.stderr.isatty()), out)


def cmd_run(args) -> int:
    """Run an experiment from a TOML config."""
    from subroutine_circuits.experiment.config import load_config
    from subroutine_circuits.experiment.runner import run_experiment

    cfg = load_config(args.config)
    if args.device != "auto":
        cfg.device = args.device
    out = Path(args.out)
    return _finish(run_experiment(cfg, out, progress=sys.stderr.isatty()), out)


def cmd_report(args) -> int:
    """Rebuild report.html of an experiment folder."""
    from subroutine_circuits.report import build_report

    out = Path(args.dir)
    if not (out / "results.csv").exists():
        raise FileNotFoundError(f"{out} has no results.csv: is it an experiment output folder?")
    path = build_report(out)
    print(f"report: {path}")
    return 0
