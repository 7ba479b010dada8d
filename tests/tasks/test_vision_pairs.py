"""Minimal pairs for patching: one predicate flipped by moving (or adding/removing) one object."""

from __future__ import annotations

import numpy as np
import pytest
from vision_checks import objects, predicates

from subroutine_circuits.tasks.vision import vision_task


def _objects_with_colour(labels, image):
    """{(pixel set, colour)} of a scene's objects."""
    out = []
    for m in objects(labels):
        ys, xs = np.nonzero(m)
        out.append((tuple(zip(ys.tolist(), xs.tolist())), tuple(image[ys[0], xs[0]].tolist())))
    return out


def _translate_free(pix):
    ys, xs = zip(*pix)
    return tuple(sorted(zip(np.subtract(ys, min(ys)), np.subtract(xs, min(xs)))))


CASES = [
    ("inside_contact", "inside"),
    ("inside_contact", "contact"),
    ("number_contact", "number"),
    ("number_contact", "contact"),
    ("inside_number", "inside"),
    ("inside_number", "number"),
]


@pytest.mark.parametrize("name,flip", CASES)
def test_minimal_pairs(name, flip):
    task = vision_task(name)
    pairs = task.make_minimal_pairs(flip, 6, seed=1)
    assert len(pairs) == 6 and pairs.contexts.shape[:2] == (6, 3)
    j = task.predicates.index(flip)
    for i in range(6):
        n = int(pairs.context_n[i])
        clean = predicates(name, pairs.clean_labels[i], n)
        corr = predicates(name, pairs.corrupted_labels[i], n)
        # default: clean breaks only `flip`, corrupted satisfies the rule
        assert clean == {p: p != flip for p in task.predicates}
        assert corr == {p: True for p in task.predicates}
        assert pairs.clean_values[i].tolist() == [p != flip for p in task.predicates]
        assert pairs.corrupted_values[i, j]
        for c in range(3):
            assert predicates(name, pairs.context_labels[i, c], n) == task.rule
        a = _objects_with_colour(pairs.clean_labels[i], pairs.clean[i])
        b = _objects_with_colour(pairs.corrupted_labels[i], pairs.corrupted[i])
        kept = set(a) & set(b)
        only_a, only_b = set(a) - kept, set(b) - kept
        if flip != "number":  # one object moved: same shape and colour, other pixels unchanged
            assert len(only_a) == len(only_b) == 1
            (pa, ca), (pb, cb) = only_a.pop(), only_b.pop()
            assert ca == cb and _translate_free(pa) == _translate_free(pb) and pa != pb
        elif name == "number_contact":  # one object added (clean has N-1) or removed (N+1)
            assert not (only_a and only_b) and len(only_a | only_b) == 1
        else:  # one nested pair added or removed
            assert not (only_a and only_b) and len(only_a | only_b) == 2


def test_pairs_tensors_and_errors():
    task = vision_task("number_contact")
    pairs = task.make_minimal_pairs("contact", 2, seed=0, n_context=2)
    t = pairs.to_tensors()
    assert tuple(t["clean"].shape) == (2, 3, 32, 32)
    assert tuple(t["contexts"].shape) == (2, 2, 3, 32, 32)
    again = task.make_minimal_pairs("contact", 2, seed=0, n_context=2)
    np.testing.assert_array_equal(pairs.clean, again.clean)
    with pytest.raises(ValueError, match="unknown predicate"):
        task.make_minimal_pairs("inside", 2)
    # explicit clean values: contact already true -> corrupted breaks contact
    p = task.make_minimal_pairs("contact", 2, seed=0, values={"number": True, "contact": True})
    for i in range(2):
        assert predicates("number_contact", p.corrupted_labels[i], int(p.context_n[i])) == {
            "number": True,
            "contact": False,
        }


def test_sample_images_cover_every_combination():
    task = vision_task("inside_contact")
    images, labels = task.sample_images(40, seed=0)
    assert images.shape == (40, 32, 32, 3) and labels.shape == (40, 32, 32)
    seen = {tuple(predicates("inside_contact", lab, 0).values()) for lab in labels}
    assert len(seen) == 4
