"""Raster primitives of the shape world, checked against scipy / colorsys / matplotlib."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
from scipy import ndimage
from vision_checks import EIGHT

from subroutine_circuits.tasks.vision import scenes as S
from subroutine_circuits.tasks.vision.render import decode_png, encode_png
from subroutine_circuits.tasks.vision.shapes import (
    dilate,
    hsv_to_rgb,
    make_templates,
    outside_fill,
    random_contours,
    render_labels,
)


def test_contours_unit_box_and_star_shaped():
    rng = np.random.default_rng(0)
    c = random_contours(rng, 50, depth=3)
    assert c.shape == (50, 32, 2)
    ext = c.max(1) - c.min(1)
    np.testing.assert_allclose(ext.max(1), 1.0)
    np.testing.assert_allclose((c.max(1) + c.min(1)) / 2, 0.0, atol=1e-12)
    # polar construction: the angle around the generating centre is monotonic, so the polygon
    # is simple; check via the signed area having one sign for every consecutive triangle fan
    centre = c.mean(1, keepdims=True)
    d = c - centre
    cross = d[:, :, 0] * np.roll(d, -1, 1)[:, :, 1] - d[:, :, 1] * np.roll(d, -1, 1)[:, :, 0]
    assert ((cross > 0).all(1) | (cross < 0).all(1)).mean() > 0.9
    with pytest.raises(ValueError):
        random_contours(rng, 2, r_min=0.6)


@pytest.mark.parametrize("size", [4.0, 9.0, 24.0, 60.0])
def test_templates_closed_8_connected_and_interior_matches_scipy(size):
    rng = np.random.default_rng(int(size))
    t = make_templates(rng, np.full(40, size))
    for i in range(len(t)):
        m = t.mask[i, : t.h[i], : t.w[i]]
        inner = t.interior[i, : t.h[i], : t.w[i]]
        assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()
        assert ndimage.label(m, structure=EIGHT)[1] == 1
        expected = ndimage.binary_fill_holes(m) & ~m
        np.testing.assert_array_equal(inner, expected)
        assert inner.any()
        # extent close to the requested size
        assert abs(max(t.h[i], t.w[i]) - 2 - size) <= 2
    assert not t.mask[:, :, :].sum() == 0
    with pytest.raises(ValueError):
        make_templates(rng, np.array([1.0]))


def test_outside_fill_matches_scipy_on_random_walls():
    rng = np.random.default_rng(3)
    walls = rng.random((20, 15, 17)) < 0.45
    out = outside_fill(walls)
    for w, o in zip(walls, out):
        lab, _ = ndimage.label(~w)  # 4-connectivity by default
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        expected = np.isin(lab, border[border > 0])
        np.testing.assert_array_equal(o, expected)


def test_dilate_matches_scipy():
    rng = np.random.default_rng(4)
    m = rng.random((3, 25, 30)) < 0.05
    for r in (0, 1, 2, 3):
        st = np.ones((2 * r + 1, 2 * r + 1), bool)
        for x, y in zip(m, dilate(m, r)):
            exp = ndimage.binary_dilation(x, structure=st) if r else x
            np.testing.assert_array_equal(y, exp)


def test_hsv_to_rgb_matches_colorsys():
    rng = np.random.default_rng(5)
    hsv = rng.random((200, 3))
    rgb = hsv_to_rgb(hsv)
    exp = np.array([colorsys.hsv_to_rgb(*x) for x in hsv]) * 255
    assert np.abs(rgb.astype(float) - exp).max() <= 0.5 + 1e-9


def test_render_labels_palette():
    lab = np.array([[[0, 1], [2, 0]]], np.uint8)
    col = np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)
    img = render_labels(lab, col)
    assert img.shape == (1, 2, 2, 3)
    assert (img[0, 0, 0] == 255).all() and (img[0, 1, 1] == 255).all()
    assert img[0, 0, 1].tolist() == [10, 20, 30] and img[0, 1, 0].tolist() == [40, 50, 60]
    with pytest.raises(ValueError):
        render_labels(np.full((1, 2, 2), 3, np.uint8), col)


@pytest.mark.parametrize("direct", [True, False])
def test_window_counts_matches_brute_force(direct, monkeypatch):
    monkeypatch.setattr(S, "_DIRECT_LIMIT", 10**12 if direct else 0)
    rng = np.random.default_rng(6)
    for hh, ww, h, w in [(20, 24, 5, 7), (40, 33, 12, 9), (9, 9, 9, 9)]:
        a = rng.random((hh, ww)) < 0.3
        k = rng.random((h, w)) < 0.5
        got = S.window_counts(a, k)
        exp = np.array(
            [
                [(a[y : y + h, x : x + w] & k).sum() for x in range(ww - w + 1)]
                for y in range(hh - h + 1)
            ]
        )
        np.testing.assert_array_equal(got, exp)


def test_png_roundtrip_with_matplotlib():
    import matplotlib.image as mpimg

    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (13, 21, 3), dtype=np.uint8)
    data = encode_png(img)
    back = mpimg.imread(io.BytesIO(data), format="png")
    np.testing.assert_array_equal(np.rint(back[..., :3] * 255).astype(np.uint8), img)
    np.testing.assert_array_equal(decode_png(data), img)
    gray = img[..., 0]
    np.testing.assert_array_equal(decode_png(encode_png(gray)), gray)
    with pytest.raises(ValueError):
        encode_png(img.astype(np.float32))


def test_augmentations_preserve_every_predicate():
    from vision_checks import predicates

    from subroutine_circuits.tasks.vision import vision_task
    from subroutine_circuits.tasks.vision.shapes import augment_labels, dihedral

    probs = vision_task("number_contact").make_problems("composite", 4, seed=0)
    lab = probs.labels.reshape(-1, 32, 32)
    n = np.repeat(probs.context_n, 4)
    for k in range(8):
        t = dihedral(lab, k)
        for i in range(len(lab)):
            assert predicates("number_contact", t[i], int(n[i])) == predicates(
                "number_contact", lab[i], int(n[i])
            )
    assert len({dihedral(lab[0], k).tobytes() for k in range(8)}) == 8
    img = augment_labels(lab, np.random.default_rng(0))
    assert img.shape == (len(lab), 32, 32, 3)
    for i in range(len(lab)):  # the background of each view is one symmetry of the original's
        white = (img[i] == 255).all(-1)
        assert any((white == (dihedral(lab[i], k) == 0)).all() for k in range(8))
    with pytest.raises(ValueError):
        dihedral(lab, 8)
