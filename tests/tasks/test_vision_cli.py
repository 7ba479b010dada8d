"""``subroutine-circuits tasks`` / ``data`` for image tasks, export round trips, problem grids."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from vision_checks import predicates

from subroutine_circuits.cli import main
from subroutine_circuits.tasks.vision import decode_png, problems_png, problems_svg, vision_task
from subroutine_circuits.tasks.vision.export import read_problems


def test_tasks_lists_vision_tasks(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for line in (
        "inside_contact      inside, contact",
        "number_contact      number, contact",
        "inside_number       inside, number",
    ):
        assert line in out
    assert "image 40 px" in out
    assert main(["tasks", "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert infos["number_contact"]["predicates"] == ["number", "contact"]
    assert infos["number_contact"]["modality"] == "image"


def test_data_npz_roundtrip(tmp_path):
    out = tmp_path / "d"
    args = ["data", "number_contact", "--out", str(out), "--n", "8", "--seed", "4"]
    assert main(args + ["--image-size", "36"]) == 0
    meta = json.loads((out / "task.json").read_text())
    assert meta["image_size"] == 36 and meta["format"] == "npz"
    task = vision_task("number_contact")
    ref = task.make_splits((8, 2, 2), seed=4, image_size=36)
    for split, n in (("train", 8), ("val", 2), ("test", 2)):
        assert meta["counts"][split] == {k: n for k in task.problem_kinds()}
        for kind in task.problem_kinds():
            got = read_problems(out / split, kind)
            want = ref[split][kind]
            for f in ("images", "labels", "odd", "values", "counts", "context_n"):
                np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
            assert got.predicates == ("number", "contact") and got.kind == kind
            rows = [json.loads(x) for x in (out / split / f"{kind}.jsonl").read_text().splitlines()]
            assert len(rows) == n
            for b, row in enumerate(rows):
                assert row["odd_index"] == int(want.odd[b]) and row["kind"] == kind
                for i in range(4):  # the JSONL labels are the pixel truth
                    assert row["values"][i] == predicates(
                        "number_contact", got.labels[b, i], row["n"]
                    )


def test_data_png_roundtrip(tmp_path):
    out = tmp_path / "p"
    assert main(["data", "inside_contact", "--out", str(out), "--n", "4", "--format", "png"]) == 0
    want = vision_task("inside_contact").make_splits((4, 1, 1), seed=0)
    got = read_problems(out / "train", "composite")
    np.testing.assert_array_equal(got.images, want["train"]["composite"].images)
    np.testing.assert_array_equal(got.values, want["train"]["composite"].values)
    np.testing.assert_array_equal(got.odd, want["train"]["composite"].odd)
    row = json.loads((out / "val" / "sub_inside.jsonl").read_text().splitlines()[0])
    img = decode_png((out / "val" / row["images"][2]).read_bytes())
    np.testing.assert_array_equal(img, want["val"]["sub_inside"].images[0, 2])


def test_data_errors(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["data", "agreement_plural", "--out", out, "--format", "png"]) == 2
    assert "image tasks" in capsys.readouterr().err
    assert main(["data", "inside_contact", "--out", out, "--image-size", "8"]) == 2
    assert main(["data", "inside_colour", "--out", out]) == 2
    with pytest.raises(SystemExit):
        main(["data", "inside_contact", "--out", out, "--format", "gif"])


def test_problem_grids():
    probs = vision_task("inside_number").make_problems("composite", 3, seed=0)
    png = problems_png(probs, n=2, scale=2)
    img = decode_png(png)
    assert img.shape[1] > img.shape[0] > 2 * 80
    # the odd image of the first problem is framed in red
    assert ((img == [220, 30, 30]).all(-1)).sum() > 100
    svg = problems_svg(probs, n=3)
    root = ET.fromstring(svg)
    images = [e for e in root.iter() if e.tag.endswith("image")]
    assert len(images) == 12
    assert b"inside=T" in svg and b"N = " in svg
    with pytest.raises(ValueError):
        problems_png(probs.subset(slice(0, 0)))
