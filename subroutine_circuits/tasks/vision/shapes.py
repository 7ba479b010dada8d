"""Raster primitives of the shape world: random contours, outline templates, interiors, colours.

Everything here is pure numpy and vectorised over a batch of shapes.

- :func:`random_contours` draws irregular closed contours by random midpoint displacement in
  polar form around 4 anchor points (radius in ``[r_min, 0.5]``, so a central hole is avoided
  and the contour is star-shaped, hence never self-intersecting), randomly rotated and rescaled
  so that the larger side of the bounding box is 1.
- :func:`make_templates` draws contours at given pixel sizes as 1-px outlines (edges sampled
  every <= 0.5 px, each sample's pixel set, so an outline is a closed 8-connected chain) at a
  random sub-pixel phase, and computes each outline's *interior*: the pixels not on the outline
  that a 4-connected walk cannot lead out of the template's padded box (our own run-sweep
  flood fill). A 4-connected walk cannot cross a closed 8-connected chain, so "object b lies
  inside object a" is exactly "every pixel of b is in a's interior" on the rendered raster.
- :func:`dilate` is the Chebyshev (square) dilation used for contact and separation tests:
  two pixel sets touch when their Chebyshev distance is 1 (8-neighbours), and are separated by
  a gap ``g`` when it is at least ``g``.
- :func:`random_colours` draws the paper's colours: HSV with h ~ U(0,1), s ~ U(0.5,1),
  v ~ U(0,1), converted to RGB uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: importing jaxtyping costs a third of a second
    from jaxtyping import Bool, Float, Int, UInt8


def random_contours(
    rng: np.random.Generator,
    n: int,
    depth: int = 3,
    roughness: float = 0.5,
    r_min: float = 0.15,
) -> Float[np.ndarray, "n v 2"]:
    """``n`` irregular closed contours of ``4 * 2**depth`` vertices, (y, x), unit bounding box.

    Midpoint displacement between 4 anchor points in polar coordinates: each level inserts, between
    two neighbouring vertices, one at the mean angle with the mean radius plus uniform noise of
    amplitude ``roughness * 0.5**level`` (times 0.5, the circle's radius); radii are clipped to
    ``[r_min, 0.5]``. The contour is centred on its bounding box and scaled so that its larger
    side is 1 (so every coordinate lies in ``[-0.5, 0.5]``).
    """
    if n < 0:
        raise ValueError(f"number of contours must be >= 0, got {n}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if not 0 < r_min < 0.5:
        raise ValueError(f"r_min must be in (0, 0.5), got {r_min}")
    base = rng.uniform(0, 2 * np.pi, size=(n, 1))
    theta = base + (np.arange(4)[None, :] + rng.uniform(-0.3, 0.3, size=(n, 4))) * (np.pi / 2)
    radius = rng.uniform(0.3, 0.5, size=(n, 4))
    for level in range(depth):
        nxt_t = np.roll(theta, -1, axis=1)
        nxt_t = np.where(nxt_t < theta, nxt_t + 2 * np.pi, nxt_t)  # the wrap-around edge
        mid_t = (theta + nxt_t) / 2
        amp = roughness * 0.5 * 0.5**level
        mid_r = (radius + np.roll(radius, -1, axis=1)) / 2 + rng.uniform(
            -amp, amp, size=radius.shape
        )
        mid_r = np.clip(mid_r, r_min, 0.5)
        theta = np.stack([theta, mid_t], axis=2).reshape(n, -1)
        radius = np.stack([radius, mid_r], axis=2).reshape(n, -1)
    pts = np.stack([radius * np.sin(theta), radius * np.cos(theta)], axis=-1)
    lo, hi = pts.min(axis=1, keepdims=True), pts.max(axis=1, keepdims=True)
    side = (hi - lo).max(axis=2, keepdims=True)
    return (pts - (lo + hi) / 2) / side


@dataclass
class Templates:
    """A batch of rasterised outlines in local boxes (1 px of empty padding on every side).

    ``mask[i, :h[i], :w[i]]`` is shape i's outline, ``interior[i]`` the pixels it encloses
    (outline excluded); cells beyond ``(h[i], w[i])`` are False.
    """

    mask: Bool[np.ndarray, "n t t"]
    interior: Bool[np.ndarray, "n t t"]
    h: Int[np.ndarray, " n"]
    w: Int[np.ndarray, " n"]

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def pixels(self, i: int) -> Int[np.ndarray, "p 2"]:
        """Local (y, x) coordinates of shape i's outline pixels."""
        return np.argwhere(self.mask[i])

    def interior_pixels(self, i: int) -> Int[np.ndarray, "q 2"]:
        """Local (y, x) coordinates of the pixels shape i encloses."""
        return np.argwhere(self.interior[i])


def rasterise_outlines(
    contours: Float[np.ndarray, "n v 2"],
    sizes: Float[np.ndarray, " n"],
    phase: Float[np.ndarray, "n 2"],
) -> tuple[Bool[np.ndarray, "n t t"], Int[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """1-px outlines of unit contours drawn ``sizes`` pixels wide at a sub-pixel ``phase``.

    Every edge is sampled at a spacing of at most 0.5 px (consecutive samples then fall into the
    same or 8-neighbouring pixels, so the outline is a closed 8-connected chain). Returns the
    masks in padded local boxes and each box's height and width (outline extent + 2).
    """
    n, v, _ = contours.shape
    if n == 0:
        return np.zeros((0, 3, 3), bool), np.zeros(0, np.int64), np.zeros(0, np.int64)
    pts = contours * sizes[:, None, None] + phase[:, None, :]
    nxt = np.roll(pts, -1, axis=1)
    edge = np.sqrt(((nxt - pts) ** 2).sum(-1)).max()
    k = int(np.ceil(2.0 * edge)) + 1
    t = (np.arange(k) / k)[None, None, :, None]
    dense = (pts[:, :, None, :] * (1 - t) + nxt[:, :, None, :] * t).reshape(n, v * k, 2)
    pix = np.floor(dense).astype(np.int64)
    pix -= pix.min(axis=1, keepdims=True)
    pix += 1
    h = pix[:, :, 0].max(axis=1) + 2
    w = pix[:, :, 1].max(axis=1) + 2
    t_side = int(max(h.max(), w.max()))
    mask = np.zeros((n, t_side, t_side), bool)
    idx = np.arange(n)[:, None]
    mask[idx, pix[:, :, 0], pix[:, :, 1]] = True
    return mask, h, w


def _sweep(free: Bool[np.ndarray, "... r c"], seed: Bool[np.ndarray, "... r c"]) -> np.ndarray:
    """Spread ``seed`` along each row over maximal runs of ``free`` cells (one sweep)."""
    shape = free.shape
    f = free.reshape(-1, shape[-1])
    s = seed.reshape(-1, shape[-1]) & f
    start = f.copy()
    start[:, 1:] &= ~f[:, :-1]
    run_id = np.cumsum(start.ravel()).reshape(f.shape)
    hit = np.zeros(int(run_id.max(initial=0)) + 1, bool)
    hit[run_id[s]] = True
    return (f & hit[run_id]).reshape(shape)


def outside_fill(walls: Bool[np.ndarray, "... r c"]) -> Bool[np.ndarray, "... r c"]:
    """Cells that a 4-connected walk over non-wall cells links to the border of the last 2 axes.

    A run-sweep flood fill: alternately spreads the reached set along rows and along columns
    over runs of free cells until nothing changes.
    """
    free = ~walls
    seed = np.zeros_like(free)
    seed[..., 0, :] = True
    seed[..., -1, :] = True
    seed[..., :, 0] = True
    seed[..., :, -1] = True
    seed &= free
    while True:
        nxt = _sweep(free, seed)
        nxt = np.swapaxes(_sweep(np.swapaxes(free, -1, -2), np.swapaxes(nxt, -1, -2)), -1, -2)
        if np.array_equal(nxt, seed):
            return seed
        seed = nxt


def make_templates(
    rng: np.random.Generator,
    sizes: Float[np.ndarray, " n"],
    depth: int = 3,
    roughness: float = 0.5,
) -> Templates:
    """Fresh random shapes drawn ``sizes`` pixels wide, with their interiors."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or (sizes.size and sizes.min() < 2.0):
        raise ValueError(f"shape sizes must be a 1-d array of values >= 2 px, got {sizes!r}")
    contours = random_contours(rng, len(sizes), depth=depth, roughness=roughness)
    phase = rng.uniform(0, 1, size=(len(sizes), 2))
    mask, h, w = rasterise_outlines(contours, sizes, phase)
    interior = ~mask & ~outside_fill(mask)
    return Templates(mask=mask, interior=interior, h=h, w=w)


def dilate(mask: Bool[np.ndarray, "... r c"], r: int) -> Bool[np.ndarray, "... r c"]:
    """Chebyshev dilation by ``r`` pixels (a ``(2r+1)`` square), over the last two axes."""
    out = mask.copy()
    if r <= 0:
        return out
    for axis in (-2, -1):
        src = out.copy()
        n = out.shape[axis]
        for d in range(1, min(r, n - 1) + 1):
            a = [slice(None)] * out.ndim
            b = [slice(None)] * out.ndim
            a[axis], b[axis] = slice(d, None), slice(None, -d)
            out[tuple(a)] |= src[tuple(b)]
            out[tuple(b)] |= src[tuple(a)]
    return out


def hsv_to_rgb(hsv: Float[np.ndarray, "... 3"]) -> UInt8[np.ndarray, "... 3"]:
    """HSV in [0, 1] to RGB uint8 (the standard hexcone formulas)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack([v, t, p], -1),
            np.stack([q, v, p], -1),
            np.stack([p, v, t], -1),
            np.stack([p, q, v], -1),
            np.stack([t, p, v], -1),
            np.stack([v, p, q], -1),
        ],
        axis=0,
    )
    rgb = np.take_along_axis(table, i[None, ..., None].repeat(3, -1), axis=0)[0]
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def random_colours(rng: np.random.Generator, shape: tuple[int, ...]) -> UInt8[np.ndarray, "... 3"]:
    """Independent object colours: h ~ U(0,1), s ~ U(0.5,1), v ~ U(0,1), as RGB uint8."""
    hsv = np.stack(
        [rng.uniform(0, 1, shape), rng.uniform(0.5, 1, shape), rng.uniform(0, 1, shape)], -1
    )
    return hsv_to_rgb(hsv)


def render_labels(
    labels: UInt8[np.ndarray, "... h w"], colours: UInt8[np.ndarray, "... k 3"]
) -> UInt8[np.ndarray, "... h w 3"]:
    """RGB images from label maps: white background (label 0), object k in ``colours[..., k-1]``."""
    lead = labels.shape[:-2]
    if colours.shape[:-2] != lead:
        raise ValueError(f"colours lead shape {colours.shape[:-2]} does not match labels {lead}")
    k = colours.shape[-2]
    if labels.size and int(labels.max()) > k:
        raise ValueError(f"a label map uses object {int(labels.max())} but only {k} colours given")
    flat_lab = labels.reshape(-1, labels.shape[-2] * labels.shape[-1]).astype(np.int64)
    pal = np.concatenate(
        [np.full((flat_lab.shape[0], 1, 3), 255, np.uint8), colours.reshape(-1, k, 3)], axis=1
    )
    out = np.take_along_axis(pal, flat_lab[:, :, None].repeat(3, -1), axis=1)
    return out.reshape(*labels.shape, 3)


def dihedral(labels: UInt8[np.ndarray, "... h w"], k: int) -> UInt8[np.ndarray, "... h w"]:
    """One of the 8 symmetries of the square (``k`` in 0..7: ``k % 4`` quarter turns, then a
    transpose when ``k >= 4``) applied to label maps. Pixel adjacency and 4-connectivity are
    preserved exactly, so inside, contact and number are unchanged."""
    if not 0 <= int(k) < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    out = np.rot90(labels, int(k) % 4, axes=(-2, -1))
    if k >= 4:
        out = np.swapaxes(out, -1, -2)
    return np.ascontiguousarray(out)


def augment_labels(
    labels: UInt8[np.ndarray, "n h w"], rng: np.random.Generator
) -> UInt8[np.ndarray, "n h w 3"]:
    """Label-preserving views: a random dihedral symmetry per image and fresh object colours."""
    ks = rng.integers(0, 8, len(labels))
    out = np.stack([dihedral(lab, int(k)) for lab, k in zip(labels, ks)]) if len(labels) else labels
    k_max = max(1, int(labels.max())) if labels.size else 1
    return render_labels(out, random_colours(rng, (len(labels), k_max)))
