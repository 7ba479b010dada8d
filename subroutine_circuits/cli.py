"""Command-line interface: ``subroutine-circuits`` / ``python -m subroutine_circuits``.

The parser is built without importing torch or TransformerLens, so ``--help`` is instant; each
subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _handler(target: str):
    """Return a function that imports ``module:function`` lazily and calls it with the args."""

    def run(args: argparse.Namespace) -> int:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)

    return run


def _add_executor_args(s: argparse.ArgumentParser) -> None:
    """``--executor``, ``--workers``, ``--scheduler``, ``--dask-workers`` (override the config)."""
    s.add_argument(
        "--executor",
        choices=("auto", "inprocess", "processes", "dask"),
        default=None,
        help="how base-model jobs run (default: the config's; dask: see docs/SCALING.md)",
    )
    s.add_argument("--workers", type=int, default=None, help="worker processes ('processes')")
    s.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="address of a running Dask scheduler (implies --executor dask), e.g. from "
        "dask-jobqueue's SLURMCluster",
    )
    s.add_argument(
        "--dask-workers",
        type=int,
        default=None,
        metavar="N",
        help="workers of the local Dask cluster (default: one per GPU, else one per core, "
        "at most 4; more than the GPUs share them round-robin)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    p = argparse.ArgumentParser(
        prog="subroutine-circuits",
        description=(
            "Does a network break a compositional task into subroutines implemented by separate "
            "subnetworks, and do those agree with activation-patching circuits?"
        ),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("tasks", help="list the built-in tasks and their predicates")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_handler("subroutine_circuits.tasks.cli:cmd_tasks"))

    s = sub.add_parser("data", help="write odd-one-out problems for a task or a data file")
    s.add_argument("task", metavar="TASK_OR_FILE", help="built-in task name or a .jsonl/.csv file")
    s.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="PRED=true|false",
        help="predicate value the positives share (repeatable; default: the task's rule)",
    )
    s.add_argument("--out", required=True, help="output folder (train/ val/ test/ inside)")
    s.add_argument("--n", type=int, default=1000, help="problems per kind in train (default 1000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image tasks only: side in pixels (default: the task's, 32 or 40)",
    )
    s.add_argument(
        "--format",
        choices=("npz", "png"),
        default=None,
        help="image tasks only: one NPZ per split and kind (default) or one PNG per image",
    )
    s.set_defaults(func=_handler("subroutine_circuits.tasks.cli:cmd_data"))

    s = sub.add_parser(
        "demo",
        help="the main job: a full structural-compositionality experiment on tiny models",
    )
    s.add_argument("--out", required=True, help="output folder (resumes if it exists)")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    s.add_argument("--no-patching", action="store_true", help="skip the patching comparison")
    s.add_argument(
        "--vision",
        action="store_true",
        help="the vision demo: shape-world Number-Contact on trained, SimCLR-pretrained and "
        "random-init CNNs (channel masks and channel patching)",
    )
    _add_executor_args(s)
    s.set_defaults(func=_handler("subroutine_circuits.experiment.cli:cmd_demo"))

    s = sub.add_parser("run", help="run an experiment from a TOML config")
    s.add_argument("config", help="TOML file (see configs/)")
    s.add_argument("--out", required=True, help="output folder (resumes if it exists)")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    _add_executor_args(s)
    s.set_defaults(func=_handler("subroutine_circuits.experiment.cli:cmd_run"))

    s = sub.add_parser("report", help="rebuild report.html of an experiment folder")
    s.add_argument("dir", help="experiment output folder")
    s.set_defaults(func=_handler("subroutine_circuits.experiment.cli:cmd_report"))

    s = sub.add_parser("patch", help="activation/attribution patching on a saved model and task")
    s.add_argument("model_dir", help="a checkpoint folder written by this library")
    s.add_argument("task", metavar="TASK_OR_FILE", help="built-in task name or a data file")
    s.add_argument("--out", required=True, help="output folder for patching.csv")
    s.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="SUBROUTINE=PATH",
        help="a saved mask to compare against (repeatable)",
    )
    s.add_argument(
        "--methods",
        default="activation,attribution",
        help="comma-separated: activation, attribution, integrated_gradients",
    )
    s.add_argument("--n", type=int, default=64, help="minimal pairs per subroutine")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_handler("subroutine_circuits.experiment.cli:cmd_patch"))

    s = sub.add_parser(
        "validate", help="error rates of the verdict and the circuit methods on planted models"
    )
    s.add_argument("--out", required=True, help="output folder (resumes if it exists)")
    s.add_argument("--seeds", type=int, nargs="+", default=None, help="planted-model seeds")
    s.add_argument(
        "--kinds", nargs="+", default=None,
        help="planted kinds (default: modular redundant random_init; entangled is opt-in)",
    )  # fmt: skip
    s.add_argument(
        "--workers", type=int, default=None,
        help="processes, one planted model each (default 2: this machine's cores)",
    )  # fmt: skip
    s.add_argument(
        "--settings", choices=("demo", "defaults"), default=None,
        help="analysis settings the planted models are studied with: the demo's (default) or "
        "the library's ExperimentConfig defaults",
    )  # fmt: skip
    s.set_defaults(func=_handler("subroutine_circuits.experiment.validate:cmd_validate"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
