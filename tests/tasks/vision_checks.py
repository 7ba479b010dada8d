"""Independent geometric checks of rendered shape-world scenes (scipy.ndimage, not the generator).

The generator measures relations with its own run-sweep flood fill and window counts; here the
same facts are recomputed from the label map alone with scipy: hole filling for interiors,
Euclidean distance transforms for contact and gaps, connected-component labelling for clumps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

EIGHT = np.ones((3, 3), bool)


def objects(label_map: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of objects 1..K (labels must be exactly 1..K)."""
    ids = np.unique(label_map)
    ids = ids[ids > 0]
    assert list(ids) == list(range(1, len(ids) + 1)), f"labels not contiguous: {ids}"
    return [label_map == k for k in ids]


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels enclosed by an outline: scipy's hole filling (4-connected background) minus it."""
    return ndimage.binary_fill_holes(mask) & ~mask


def min_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Least Euclidean distance between pixel centres of a and b."""
    return float(ndimage.distance_transform_edt(~a)[b].min())


def measure(label_map: np.ndarray) -> dict:
    """Count, pairwise contact / containment / gaps, clumps, crossing, from the label map."""
    masks = objects(label_map)
    k = len(masks)
    inner = [interior(m) for m in masks]
    touch = np.zeros((k, k), bool)
    contains = np.zeros((k, k), bool)
    dist = np.full((k, k), np.inf)
    crossing = False
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            dist[i, j] = min_distance(masks[i], masks[j])
            touch[i, j] = dist[i, j] < 1.5  # 8-neighbours: 1 or sqrt(2)
            inside = (masks[j] & inner[i]).sum()
            contains[i, j] = inside == masks[j].sum()
            crossing |= 0 < inside < masks[j].sum()
    # every object is a single closed outline: one 8-connected piece that encloses something
    single = all(ndimage.label(m, structure=EIGHT)[1] == 1 for m in masks)
    closed = all(x.any() for x in inner)
    clumps = ndimage.label(label_map > 0, structure=EIGHT)[1]
    border = np.concatenate([label_map[0], label_map[-1], label_map[:, 0], label_map[:, -1]])
    return {
        "k": k,
        "touch": touch,
        "contains": contains,
        "dist": dist,
        "crossing": crossing,
        "single": single,
        "closed": closed,
        "clumps": clumps,
        "off_border": not border.any(),
    }


def predicates(task: str, label_map: np.ndarray, n: int) -> dict[str, bool]:
    """The task's predicate values recomputed from a label map (``n``: the problem's N)."""
    m = measure(label_map)
    assert m["single"] and m["closed"] and m["off_border"] and not m["crossing"], m
    k = m["k"]
    if task == "inside_contact":
        assert k == 2
        return {"inside": bool(m["contains"].any()), "contact": bool(m["touch"][0, 1])}
    if task == "number_contact":
        assert k >= 2 and not m["contains"].any()
        return {"number": k == n, "contact": m["clumps"] == 1}
    if task == "inside_number":
        assert not m["touch"].any()
        links = m["contains"].sum(0) + m["contains"].sum(1)
        return {"inside": bool((links == 1).all()), "number": k == 2 * n}
    raise AssertionError(task)
