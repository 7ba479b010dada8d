"""CLI handlers of ``subroutine-circuits tasks`` and ``subroutine-circuits data``.

``data`` writes, for a built-in task or a user file, seeded OOO problems as JSONL::

    OUT/train/composite.jsonl  OUT/train/sub_<p>.jsonl  OUT/train/partition_<p>.jsonl
    OUT/val/...                OUT/test/...
    OUT/task.json              (task, rule, seed, counts)   OUT/tokenizer.json

``--n`` problems per kind in train; val and test get ``max(1, n // 4)`` each. Each line is
``{"stimuli": [4 texts], "odd_index": i, "kind": ..., "values": [4 dicts]}``.

For an image task (``inside_contact``, ``number_contact``, ``inside_number``) it writes per
split and kind an NPZ (``--format npz``, the default) or PNG files (``--format png``) plus a
JSONL of labels, at ``--image-size`` pixels (default: the task's); see
``tasks.vision.export``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subroutine_circuits.tasks import registry
from subroutine_circuits.tasks.base import SPLITS, make_splits


def parse_rule(items: list[str] | None) -> dict[str, bool] | None:
    """``["PRED=true", "Q=false"]`` -> ``{"PRED": True, "Q": False}`` (empty -> None)."""
    if not items:
        return None
    from subroutine_circuits.tasks.user import parse_bool

    rule: dict[str, bool] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--rule {item!r} must look like PRED=true or PRED=false")
        pred, value = item.split("=", 1)
        pred = pred.strip()
        if not pred:
            raise ValueError(f"--rule {item!r} names no predicate")
        rule[pred] = parse_bool(value, f"--rule {item!r}")
    return rule


def cmd_tasks(args: argparse.Namespace) -> int:
    """Print the built-in tasks, their predicates and default rules (table or ``--json``)."""
    infos = [registry.get_task(name).to_json() for name in registry.list_tasks()]
    infos += [registry.get_vision_task(name).to_json() for name in registry.list_vision_tasks()]
    if getattr(args, "json", False):
        print(json.dumps(infos, indent=2))
        return 0
    rows = [
        (
            i["name"],
            ", ".join(i["predicates"]),
            ", ".join(f"{k}={str(v).lower()}" for k, v in i["rule"].items()),
            f"image {i['image_size']} px" if i.get("modality") == "image" else "text",
        )
        for i in infos
    ]
    header = ("task", "predicates", "rule", "input")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Write train/val/test OOO problems of every kind for a task or data file (see above)."""
    from subroutine_circuits.utils import atomic_write_json, atomic_write_text

    n = int(args.n)
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    rule = parse_rule(getattr(args, "rule", None))
    spec = str(args.task)
    image_size = getattr(args, "image_size", None)
    fmt = getattr(args, "format", None)
    if registry.is_vision_task(spec):
        return _data_vision(args, spec, n, rule, image_size, fmt or "npz")
    if image_size is not None or fmt is not None:
        raise ValueError(
            f"--image-size and --format apply to image tasks "
            f"({', '.join(registry.list_vision_tasks())}), not to {spec!r}"
        )
    if not spec.lower().endswith((".jsonl", ".csv")) and spec not in registry.list_tasks():
        known = registry.list_tasks() + registry.list_vision_tasks()
        raise ValueError(
            f"unknown task {spec!r}; known tasks: {', '.join(known)} (or give a .jsonl/.csv file)"
        )
    task = registry.load_task(spec, rule=rule)
    n_eval = max(1, n // 4)
    splits = make_splits(task, n, seed=int(args.seed), split_sizes=(n, n_eval, n_eval))
    out = Path(args.out)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts[split] = {}
        for kind, problems in splits[split].items():
            lines = "".join(json.dumps(p.to_json()) + "\n" for p in problems)
            atomic_write_text(out / split / f"{kind}.jsonl", lines)
            counts[split][kind] = len(problems)
    meta = task.to_json()
    meta.update({"source": spec, "seed": int(args.seed), "counts": counts})
    atomic_write_json(out / "task.json", meta)
    task.tokenizer().save(out / "tokenizer.json")
    total = sum(sum(c.values()) for c in counts.values())
    print(f"wrote {total} problems of task {task.name!r} to {out}")
    return 0


def _data_vision(args, spec, n, rule, image_size, fmt) -> int:
    """``data`` for an image task: NPZ or PNG files plus JSONL labels per split and kind."""
    from subroutine_circuits.tasks.vision.export import export_task

    if image_size is not None and int(image_size) < 16:
        raise ValueError(f"--image-size must be >= 16, got {image_size}")
    task = registry.get_vision_task(spec, rule=rule)
    out = Path(args.out)
    counts = export_task(task, out, n, seed=int(args.seed), image_size=image_size, fmt=fmt)
    total = sum(sum(c.values()) for c in counts.values())
    size = int(image_size or task.image_size)
    print(f"wrote {total} image problems of task {task.name!r} ({size} px, {fmt}) to {out}")
    return 0
