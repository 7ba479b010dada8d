"""Writing image problems to disk: per split and kind an NPZ or PNG files, plus JSONL labels.

Layout (``fmt="npz"``)::

    OUT/train/composite.npz   images [b,4,h,w,3] uint8, labels [b,4,h,w] uint8, odd [b],
                              values [b,4,p] bool, counts [b,4], context_n [b], predicates
    OUT/train/composite.jsonl one line per problem: index, kind, odd_index, values, counts, n
    OUT/val/...  OUT/test/...  OUT/task.json (task, rule, seed, image size, counts, format)

With ``fmt="png"`` the images go to ``OUT/<split>/<kind>/<index>_<i>.png`` instead, and each
JSONL line also lists its 4 file names (relative to the split folder) under ``"images"``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from subroutine_circuits.tasks.base import SPLITS
from subroutine_circuits.tasks.vision.render import decode_png, encode_png
from subroutine_circuits.tasks.vision.task import ImageProblems, ImageTask

FORMATS: tuple[str, ...] = ("npz", "png")


def write_problems(problems: ImageProblems, folder: str | os.PathLike, fmt: str = "npz") -> int:
    """Write one kind's problems into ``folder`` (see the module docstring); returns the count."""
    from subroutine_circuits.utils import atomic_write_bytes, atomic_write_text

    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; choose one of {FORMATS}")
    folder = Path(folder)
    kind = problems.kind
    rows = []
    for b in range(len(problems)):
        row = problems.to_json(b)
        if fmt == "png":
            names = [f"{kind}/{b:05d}_{i}.png" for i in range(4)]
            for i, name in enumerate(names):
                atomic_write_bytes(folder / name, encode_png(problems.images[b, i]))
            row["images"] = names
        rows.append(row)
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, **problems.to_npz_dict())
        atomic_write_bytes(folder / f"{kind}.npz", buf.getvalue())
    atomic_write_text(folder / f"{kind}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return len(problems)


def export_task(
    task: ImageTask,
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    image_size: int | None = None,
    fmt: str = "npz",
) -> dict[str, dict[str, int]]:
    """Write ``n`` train problems per kind and ``max(1, n // 4)`` val and test problems.

    Returns the counts per split and kind (also stored in ``OUT/task.json``).
    """
    from subroutine_circuits.utils import atomic_write_json

    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; choose one of {FORMATS}")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    n_eval = max(1, n // 4)
    splits = task.make_splits((n, n_eval, n_eval), seed=seed, image_size=image_size)
    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts[split] = {}
        for kind, problems in splits[split].items():
            counts[split][kind] = write_problems(problems, out / split, fmt)
    meta = task.to_json()
    meta.update(
        {
            "seed": int(seed),
            "image_size": int(image_size or task.image_size),
            "format": fmt,
            "counts": counts,
        }
    )
    atomic_write_json(out / "task.json", meta)
    return counts


def read_problems(folder: str | os.PathLike, kind: str) -> ImageProblems:
    """Read one kind's problems back from a split folder written in either format."""
    folder = Path(folder)
    npz = folder / f"{kind}.npz"
    if npz.exists():
        with np.load(npz) as data:
            return ImageProblems.from_npz(data)
    jsonl = folder / f"{kind}.jsonl"
    if not jsonl.exists():
        raise FileNotFoundError(f"no {kind}.npz or {kind}.jsonl in {folder}")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{jsonl} holds no problems")
    if "images" not in rows[0]:
        raise ValueError(f"{jsonl} lists no image files (was it written as npz?)")
    preds = tuple(rows[0]["values"][0])
    images = np.stack(
        [np.stack([decode_png((folder / f).read_bytes()) for f in r["images"]]) for r in rows]
    )
    return ImageProblems(
        images=images,
        labels=np.zeros(images.shape[:-1], np.uint8),  # PNG exports carry no label maps
        odd=np.array([r["odd_index"] for r in rows], np.int64),
        values=np.array([[[v[p] for p in preds] for v in r["values"]] for r in rows], bool),
        counts=np.array([r["counts"] for r in rows], np.int64),
        context_n=np.array([r["n"] for r in rows], np.int64),
        predicates=preds,
        kind=str(rows[0]["kind"]),
        task=str(rows[0].get("task", "")),
    )
