"""Image OOO problems: every label re-checked independently, kind semantics, balance, splits."""

from __future__ import annotations

import numpy as np
import pytest
from vision_checks import measure, predicates

from subroutine_circuits.tasks import get_task, get_vision_task, list_vision_tasks
from subroutine_circuits.tasks.vision import ImageTask, WorldConfig, scene_keys, vision_task

TASKS = ("inside_contact", "number_contact", "inside_number")


@pytest.fixture(scope="module")
def problems():
    """12 problems of every kind of every task at the default sizes (generated once)."""
    out = {}
    for name in TASKS:
        task = vision_task(name)
        out[name] = {k: task.make_problems(k, 12, seed=11) for k in task.problem_kinds()}
    return out


def _recomputed(name, probs):
    """Predicate values of every image, recomputed from the label maps with scipy."""
    preds = probs.predicates
    vals = np.zeros(probs.values.shape, bool)
    for b in range(len(probs)):
        for i in range(4):
            v = predicates(name, probs.labels[b, i], int(probs.context_n[b]))
            vals[b, i] = [v[p] for p in preds]
    return vals


@pytest.mark.parametrize("name", TASKS)
def test_every_label_is_true_on_the_raster(name, problems):
    for kind, probs in problems[name].items():
        vals = _recomputed(name, probs)
        np.testing.assert_array_equal(vals, probs.values, err_msg=f"{name} {kind}")
        # the images show exactly the label maps: white background, one colour per object
        img, lab = probs.images, probs.labels
        assert (img[lab == 0] == 255).all()
        assert not (img[lab > 0] == 255).all(-1).any()
        for b in range(len(probs)):
            for i in range(4):
                for k in range(1, int(lab[b, i].max()) + 1):
                    colours = img[b, i][lab[b, i] == k]
                    assert (colours == colours[0]).all()
        assert (probs.counts == lab.reshape(*lab.shape[:2], -1).max(-1)).all()


def test_gaps_of_separated_objects(problems):
    """Objects that do not touch are at least the configured gap apart (2 inside a container)."""
    for name in ("inside_contact", "inside_number"):
        for probs in problems[name].values():
            for b in range(len(probs)):
                for i in range(4):
                    m = measure(probs.labels[b, i])
                    inside = m["contains"] | m["contains"].T
                    sep = ~m["touch"] & ~np.eye(m["k"], dtype=bool)
                    assert (m["dist"][sep & inside] >= 2).all()
                    assert (m["dist"][sep & ~inside] >= 3).all()


@pytest.mark.parametrize("name", TASKS)
def test_kind_semantics_and_balance(name, problems):
    task = vision_task(name)
    a, b = task.predicates
    for kind, probs in problems[name].items():
        vals = _recomputed(name, probs)  # semantics judged on the pixel truth
        n = len(probs)
        assert sorted(np.bincount(probs.odd, minlength=4).tolist()) == [3, 3, 3, 3]
        odd = vals[np.arange(n), probs.odd]
        pos = np.stack([np.delete(vals[j], probs.odd[j], axis=0) for j in range(n)])
        if kind == "composite":
            assert pos.all()
            assert (~odd).any(1).all()
            broken = [tuple(~o) for o in odd]
            counts = {c: broken.count(c) for c in [(True, False), (False, True), (True, True)]}
            assert sorted(counts.values()) == [4, 4, 4], counts
        elif kind.startswith("sub_"):
            j = task.predicates.index(kind[4:])
            assert pos[..., j].all() and not odd[:, j].any()
            other = 1 - j
            assert pos[..., other].any() and not pos[..., other].all()
        else:
            j = task.predicates.index(kind[len("partition_") :])
            assert pos.all()
            assert not odd[:, j].any() and odd[:, 1 - j].all()
        if task.world().relational:
            assert set(np.unique(probs.context_n)) <= {2, 3}
            assert len(np.unique(probs.context_n)) == 2 or n < 8
        assert {a, b} == set(probs.predicates)


def test_number_is_relational(problems):
    """Positives share the problem's N; the odd one of a number partition has N +- 1."""
    probs = problems["number_contact"]["partition_number"]
    for b in range(len(probs)):
        n = probs.context_n[b]
        for i in range(4):
            if i == probs.odd[b]:
                assert abs(int(probs.counts[b, i]) - n) == 1 and probs.counts[b, i] >= 2
            else:
                assert probs.counts[b, i] == n
    probs = problems["inside_number"]["partition_number"]
    for b in range(len(probs)):
        n = probs.context_n[b]
        pos = [probs.counts[b, i] for i in range(4) if i != probs.odd[b]]
        assert pos == [2 * n] * 3
        assert abs(int(probs.counts[b, probs.odd[b]]) - 2 * n) == 2


def test_number_contact_shares_one_shape_per_problem(problems):
    probs = problems["number_contact"]["composite"]
    for b in range(len(probs)):
        shapes = set()
        for i in range(4):
            lab = probs.labels[b, i]
            for k in range(1, lab.max() + 1):
                ys, xs = np.nonzero(lab == k)
                shapes.add(tuple(zip(ys - ys.min(), xs - xs.min())))
        # touching copies may lose no pixel (outlines never share one), so all are identical
        assert len(shapes) == 1


def test_determinism_and_seed_dependence():
    task = vision_task("number_contact")
    p1 = task.make_problems("composite", 6, seed=3)
    p2 = task.make_problems("composite", 6, seed=3)
    p3 = task.make_problems("composite", 6, seed=4)
    for f in ("images", "labels", "odd", "values", "counts", "context_n"):
        np.testing.assert_array_equal(getattr(p1, f), getattr(p2, f))
    assert not np.array_equal(p1.labels, p3.labels)


def test_splits_disjoint_and_sized():
    task = vision_task("inside_contact")
    splits = task.make_splits((8, 4, 4), seed=2)
    assert set(splits) == {"train", "val", "test"}
    keys = {}
    for split, kinds in splits.items():
        assert list(kinds) == task.problem_kinds()
        for probs in kinds.values():
            assert len(probs) == {"train": 8, "val": 4, "test": 4}[split]
        keys[split] = set().union(*(scene_keys(p.labels) for p in kinds.values()))
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    # the int form: val and test get a quarter; a dict restricts the kinds
    s2 = task.make_splits(8, seed=2)
    assert len(s2["val"]["composite"]) == 2
    s3 = task.make_splits({"composite": 4}, seed=2)
    assert list(s3["train"]) == ["composite"]


def test_excluded_scenes_are_redrawn():
    task = vision_task("inside_contact")
    first = task.make_problems("composite", 3, seed=5)
    again = task.make_problems("composite", 3, seed=5, exclude=scene_keys(first.labels[:1]))
    assert not scene_keys(again.labels) & scene_keys(first.labels[:1])


def test_to_tensor_normalisation():
    probs = vision_task("inside_contact").make_problems("composite", 2, seed=0)
    x = probs.to_tensor()
    assert tuple(x.shape) == (2, 4, 3, 32, 32)
    assert str(x.dtype) == "torch.float32"
    white = probs.labels == 0
    np.testing.assert_allclose(x.numpy().transpose(0, 1, 3, 4, 2)[white], 1.0, atol=1e-5)
    exp = (probs.images.astype(np.float32) / 255 - 0.9) / 0.1
    np.testing.assert_allclose(x.numpy(), exp.transpose(0, 1, 4, 2, 3), atol=1e-5)
    assert probs.odd_tensor().tolist() == probs.odd.tolist()


@pytest.mark.parametrize("name", TASKS)
def test_paper_size_128(name):
    task = vision_task(name, image_size=128)
    probs = task.make_problems("composite", 2, seed=1)
    assert probs.images.shape == (2, 4, 128, 128, 3)
    np.testing.assert_array_equal(_recomputed(name, probs), probs.values)


def test_registry_and_rules():
    assert list_vision_tasks() == list(TASKS)
    t = get_task("inside_contact")
    assert isinstance(t, ImageTask) and t.predicates == ("inside", "contact")
    t = get_vision_task("inside_number", image_size=48)
    assert t.image_size == 48 and t.rule == {"inside": True, "number": True}
    r = get_task("inside_contact", rule={"inside": False, "contact": True})
    probs = r.make_problems("partition_contact", 4, seed=0)
    vals = _recomputed("inside_contact", probs)
    for b in range(4):
        for i in range(4):
            exp = [False, i != probs.odd[b]]
            assert vals[b, i].tolist() == exp
    assert t.to_json()["modality"] == "image"


def test_bad_input():
    task = vision_task("inside_contact")
    with pytest.raises(ValueError, match="unknown problem kind"):
        task.make_problems("sub_number", 2)
    with pytest.raises(ValueError, match=">= 0"):
        task.make_problems("composite", -1)
    with pytest.raises(ValueError, match="unknown predicate"):
        task.with_rule({"colour": True})
    with pytest.raises(ValueError, match="image_size"):
        task.world(8)
    with pytest.raises(ValueError, match="unknown vision task"):
        vision_task("inside_colour")
    with pytest.raises(ValueError, match="inner_ratio"):
        WorldConfig(inner_ratio=(0.5, 0.2)).check()
    with pytest.raises(ValueError, match="gap"):
        vision_task("inside_contact", cfg=WorldConfig(gap=1)).world()
    with pytest.raises(ValueError, match="unknown task"):
        get_task("inside_colour")
    with pytest.raises(ValueError, match=r"\(n_train, n_val, n_test\)"):
        task.make_splits((1, 2), seed=0)
