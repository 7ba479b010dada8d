"""Scenes of the shape world and the three worlds that realise the paper's predicates.

A :class:`Scene` is a square canvas with objects, each a rasterised outline (:class:`Shape`)
placed at an integer offset, so its pixels, its interior and every relation between objects are
exact on the raster. Objects never share a pixel and stay 1 px away from the canvas border.

Placement is exact, not trial and error: :func:`fit_offsets` evaluates *every* integer offset of
a shape at once (a gather of the shape's pixels over the canvas) against the constraints
"all pixels in ``allowed``", "some pixel in ``touch``" and "no existing pixel in the shape's
interior", and a valid offset is drawn uniformly. After a scene is built, :func:`relations`
recomputes touching and containment from the rendered masks and the world's ``evaluate``
derives the predicate values from them; a scene whose values differ from the requested ones
(or that has overlapping or crossing outlines) is rejected and drawn again.

Relations on the raster:
- ``touch[i, j]``: some pixel of i and some pixel of j are 8-neighbours (Chebyshev distance 1).
- ``contains[i, j]``: every pixel of j lies in i's interior (the non-outline pixels that no
  4-connected walk links to the outside of i's outline).
- crossing (rejected): some but not all pixels of j lie in i's interior.

Worlds (predicates in the order of the composite task):
- :class:`InsideContactWorld` (``inside``, ``contact``): 2 objects, a big outer and a small inner;
  inside = one contains the other, contact = they touch.
- :class:`NumberContactWorld` (``number``, ``contact``): the problem draws N in {2, 3}, one shape
  and one size shared by every object of its 4 images; number = the image has N objects,
  contact = all its objects form one touching clump. Positives: a clump of N; no number: a clump
  of N-1 or N+1 (at least 2); no contact: a clump of N-1 plus one separate object; both broken:
  N-1 or N+1 objects (at least 2), a clump plus one separate object.
- :class:`InsideNumberWorld` (``inside``, ``number``): the problem draws N in {2, 3}; inside =
  every object is in exactly one containment relation (nested pairs), number = the image has 2N
  objects; nothing touches. Positives: N nested pairs; no number: N-1 or N+1 pairs (at least 1);
  no inside: N-1 pairs plus a loose big and a loose small; both broken: 2N-1 or 2N+1 objects
  (the nested pairs plus one loose big or small).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from subroutine_circuits.tasks.vision.shapes import dilate, make_templates, random_colours

if TYPE_CHECKING:
    from jaxtyping import Bool, Int, UInt8


@dataclass
class WorldConfig:
    """Geometry of a shape world. ``None`` fields take size-dependent defaults (see ``resolve``).

    Sizes are fractions of the image side (outer/big/object sizes) or of the outer object's size
    (``inner_ratio``). ``gap``: the least Chebyshev distance between outlines that must not touch
    (3 = at least two white pixels between); ``inside_gap``: the same between a contained object
    and its container. ``depth``: midpoint-displacement levels (``4 * 2**depth`` vertices).
    """

    image_size: int = 32
    outer_size: tuple[float, float] | None = None
    inner_ratio: tuple[float, float] | None = None
    gap: int | None = None
    inside_gap: int | None = None
    depth: int | None = None
    roughness: float = 0.5
    pool_batch: int = 256

    def check(self) -> None:
        """Raise ValueError on an impossible configuration."""
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        for name in ("outer_size", "inner_ratio"):
            r = getattr(self, name)
            if r is not None and not (len(r) == 2 and 0 < r[0] <= r[1] < 1):
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi < 1, got {r!r}")
        for name in ("gap", "inside_gap"):
            g = getattr(self, name)
            if g is not None and g < 2:
                raise ValueError(f"{name} must be >= 2 (1 would be touching), got {g!r}")
        if self.depth is not None and not 0 <= self.depth <= 6:
            raise ValueError(f"depth must be in 0..6, got {self.depth!r}")
        if self.pool_batch < 1:
            raise ValueError(f"pool_batch must be >= 1, got {self.pool_batch}")


# ----------------------------------------------------------------------------- objects, scenes
class Shape:
    """A rasterised outline in its padded local box (1 empty pixel on every side).

    ``mask`` is the outline, ``interior`` the pixels it encloses (both ``(h, w)`` bool);
    ``pix`` and ``inner`` list their (y, x) coordinates.
    """

    __slots__ = ("mask", "interior", "h", "w", "_pix", "_inner")

    def __init__(self, mask: Bool[np.ndarray, "h w"], interior: Bool[np.ndarray, "h w"]) -> None:
        if mask.shape != interior.shape or mask.ndim != 2:
            raise ValueError(f"mask {mask.shape} and interior {interior.shape} must be equal 2-d")
        self.mask, self.interior = mask, interior
        self.h, self.w = int(mask.shape[0]), int(mask.shape[1])
        self._pix: np.ndarray | None = None
        self._inner: np.ndarray | None = None

    @property
    def pix(self) -> Int[np.ndarray, "p 2"]:
        """Local (y, x) coordinates of the outline pixels."""
        if self._pix is None:
            self._pix = np.argwhere(self.mask)
        return self._pix

    @property
    def inner(self) -> Int[np.ndarray, "q 2"]:
        """Local (y, x) coordinates of the enclosed pixels."""
        if self._inner is None:
            self._inner = np.argwhere(self.interior)
        return self._inner

    @classmethod
    def union(cls, a: Shape, b: Shape, dy: int, dx: int) -> Shape:
        """``a`` with ``b`` drawn at ``(dy, dx)`` in its box (interior: ``a``'s)."""
        m = a.mask.copy()
        m[dy : dy + b.h, dx : dx + b.w] |= b.mask
        return cls(m, a.interior)


@dataclass
class SceneObject:
    """A shape placed with its local box's top-left corner at canvas pixel ``(y, x)``."""

    shape: Shape
    y: int
    x: int
    role: str = "object"


@dataclass
class Scene:
    """A square canvas of ``size`` pixels with objects (label k = ``objects[k-1]``) and colours."""

    size: int
    objects: list[SceneObject] = field(default_factory=list)
    colours: list[np.ndarray] = field(default_factory=list)

    def copy(self) -> Scene:
        """A copy whose object list can be changed without touching this scene."""
        return Scene(self.size, [copy.copy(o) for o in self.objects], list(self.colours))

    def mask(self, i: int) -> Bool[np.ndarray, "h w"]:
        """Canvas mask of object i's outline."""
        return _stamp(self.objects[i].shape.pix, self.objects[i], self.size)

    def masks(self) -> Bool[np.ndarray, "k h w"]:
        """Canvas masks of every object's outline."""
        return _stack([_stamp(o.shape.pix, o, self.size) for o in self.objects], self.size)

    def interiors(self) -> Bool[np.ndarray, "k h w"]:
        """Canvas masks of every object's interior."""
        return _stack([_stamp(o.shape.inner, o, self.size) for o in self.objects], self.size)

    def label_map(self) -> UInt8[np.ndarray, "h w"]:
        """0 = background, k = object k (1-based, in the order of ``objects``)."""
        out = np.zeros((self.size, self.size), np.uint8)
        for k, o in enumerate(self.objects, start=1):
            out[o.shape.pix[:, 0] + o.y, o.shape.pix[:, 1] + o.x] = k
        return out

    def colour_array(self, k_max: int) -> UInt8[np.ndarray, "k 3"]:
        """Object colours padded with white to ``k_max`` rows."""
        out = np.full((k_max, 3), 255, np.uint8)
        for k, c in enumerate(self.colours[:k_max]):
            out[k] = c
        return out


def _stamp(pix: np.ndarray, obj: SceneObject, size: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[pix[:, 0] + obj.y, pix[:, 1] + obj.x] = True
    return m


def _stack(masks: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(masks) if masks else np.zeros((0, size, size), bool)


@dataclass
class Relations:
    """Pairwise raster relations of a scene's objects (see the module docstring)."""

    touch: Bool[np.ndarray, "k k"]
    contains: Bool[np.ndarray, "k k"]
    overlap: bool
    crossing: bool

    @property
    def valid(self) -> bool:
        """No shared pixel and no outline crossing another's boundary."""
        return not (self.overlap or self.crossing)


def relations(masks: Bool[np.ndarray, "k h w"], interiors: Bool[np.ndarray, "k h w"]) -> Relations:
    """Touching, containment, overlap and crossing of K objects from their canvas masks."""
    k = masks.shape[0]
    flat = masks.reshape(k, -1).astype(np.float32)
    near = dilate(masks, 1).reshape(k, -1).astype(np.float32)
    inn = interiors.reshape(k, -1).astype(np.float32)
    touch = (near @ flat.T) > 0
    cnt = inn @ flat.T  # cnt[i, j]: pixels of j inside i
    size = flat.sum(1)
    contains = (cnt == size[None, :]) & (size[None, :] > 0)
    crossing = (cnt > 0) & (cnt < size[None, :])
    np.fill_diagonal(touch, False)
    np.fill_diagonal(contains, False)
    np.fill_diagonal(crossing, False)
    overlap = bool((masks.sum(0) > 1).any())
    return Relations(touch=touch, contains=contains, overlap=overlap, crossing=bool(crossing.any()))


def connected(adj: Bool[np.ndarray, "k k"]) -> bool:
    """Whether the undirected graph with adjacency ``adj`` is connected (k >= 1)."""
    k = adj.shape[0]
    if k == 0:
        return False
    seen = np.zeros(k, bool)
    seen[0] = True
    frontier = seen.copy()
    while frontier.any():
        nxt = adj[frontier].any(0) & ~seen
        seen |= nxt
        frontier = nxt
    return bool(seen.all())


# ----------------------------------------------------------------------------- placement
_DIRECT_LIMIT = 400_000  # windows x kernel cells above which counts go through an FFT


def window_counts(
    canvas: Bool[np.ndarray, "H W"], kernel: Bool[np.ndarray, "h w"]
) -> Int[np.ndarray, "ny nx"]:
    """For every placement of ``kernel`` inside ``canvas``: how many kernel cells hit canvas cells.

    ``out[y, x] = sum(canvas[y:y+h, x:x+w] & kernel)``. Small problems multiply a matrix of all
    windows by the kernel; large ones (e.g. 128 px canvases) use an exact FFT correlation
    (rounded: the counts are integers far below float64's precision).
    """
    (bh, bw), (h, w) = canvas.shape, kernel.shape
    ny, nx = bh - h + 1, bw - w + 1
    if ny <= 0 or nx <= 0:
        return np.zeros((max(ny, 0), max(nx, 0)), np.int64)
    if ny * nx * h * w <= _DIRECT_LIMIT:
        win = np.lib.stride_tricks.sliding_window_view(canvas.astype(np.float32), (h, w))
        out = win.reshape(ny * nx, h * w) @ kernel.reshape(-1).astype(np.float32)
        return np.rint(out).astype(np.int64).reshape(ny, nx)
    fa = np.fft.rfft2(canvas.astype(np.float64), s=(bh, bw))
    fk = np.fft.rfft2(kernel.astype(np.float64), s=(bh, bw))
    corr = np.fft.irfft2(fa * np.conj(fk), s=(bh, bw))
    return np.rint(corr[:ny, :nx]).astype(np.int64)


def fit_offsets(
    shape: Shape,
    size: int,
    allowed: Bool[np.ndarray, "h w"] | None = None,
    touch: Bool[np.ndarray, "h w"] | None = None,
    enclose_none: Bool[np.ndarray, "h w"] | None = None,
    box: tuple[int, int] | None = None,
) -> Int[np.ndarray, "m 2"]:
    """Every top-left offset where ``shape`` fits the constraints, as (y, x) rows.

    All of the shape's pixels must be in ``allowed`` (None: anywhere), at least one in ``touch``
    (None: no requirement), and none of the ``enclose_none`` pixels may lie in its interior.
    The shape's padded box must lie within a ``box`` = (height, width) canvas (default: the
    ``size`` x ``size`` canvas), so outlines stay 1 px away from the border. Each constraint is
    a count over every placement at once (:func:`window_counts`).
    """
    bh, bw = box if box is not None else (size, size)
    ny, nx = bh - shape.h + 1, bw - shape.w + 1
    if ny <= 0 or nx <= 0:
        return np.zeros((0, 2), np.int64)
    ok = np.ones((ny, nx), bool)
    if allowed is not None:
        ok &= window_counts(~allowed[:bh, :bw], shape.mask) == 0
    if touch is not None:
        ok &= window_counts(touch[:bh, :bw], shape.mask) > 0
    if enclose_none is not None and shape.interior.any():
        ok &= window_counts(enclose_none[:bh, :bw], shape.interior) == 0
    return np.argwhere(ok)


def _choose(rng: np.random.Generator, offsets: np.ndarray) -> tuple[int, int] | None:
    if len(offsets) == 0:
        return None
    y, x = offsets[int(rng.integers(len(offsets)))]
    return int(y), int(x)


class _Pool:
    """Templates drawn in vectorised batches and handed out one group at a time.

    ``sizes(rng, n)`` returns an ``(n, m)`` array of pixel sizes: every group is ``m`` linked
    shapes (e.g. an outer and its inner object).
    """

    def __init__(self, rng: np.random.Generator, sizes, cfg: WorldConfig) -> None:
        self.rng, self.sizes, self.cfg = rng, sizes, cfg
        self.buf: list[tuple[Shape, ...]] = []

    def _refill(self) -> None:
        sizes = np.maximum(np.asarray(self.sizes(self.rng, self.cfg.pool_batch), float), 3.0)
        cols = []
        for j in range(sizes.shape[1]):
            t = make_templates(
                self.rng, sizes[:, j], depth=self.cfg.depth, roughness=self.cfg.roughness
            )
            cols.append(
                [
                    Shape(t.mask[i, : t.h[i], : t.w[i]], t.interior[i, : t.h[i], : t.w[i]])
                    for i in range(len(t))
                ]
            )
        # a shape must enclose at least one pixel (tiny shapes can rasterise to a solid blob)
        groups = [g for g in zip(*cols) if all(sh.interior.any() for sh in g)]
        self.buf = groups[::-1]

    def next(self) -> tuple[Shape, ...]:
        """The next group of shapes (every shape encloses at least one pixel)."""
        for _ in range(100):
            if self.buf:
                return self.buf.pop()
            self._refill()
        raise PlacementError("the drawn shapes are too small to enclose any pixel")


class PlacementError(Exception):
    """A scene could not be built with the drawn shapes (the caller draws again)."""


# ----------------------------------------------------------------------------- worlds
class ShapeWorld:
    """Base of the three worlds: config, template pools, scene drawing with rejection."""

    predicates: tuple[str, ...] = ()
    relational: bool = False
    default_size: int = 32

    def __init__(self, cfg: WorldConfig | None = None) -> None:
        cfg = copy.copy(cfg) if cfg is not None else WorldConfig(image_size=self.default_size)
        cfg.check()
        small = cfg.image_size < 64
        if cfg.gap is None:
            cfg.gap = 3
        if cfg.inside_gap is None:
            cfg.inside_gap = 2 if small else 3
        if cfg.depth is None:
            cfg.depth = 3 if small else 4
        self.cfg = cfg
        self.size = cfg.image_size

    # --- to implement
    def pools(self, rng: np.random.Generator) -> dict[str, _Pool]:
        """Template pools used by :meth:`build` (drawn from ``rng``)."""
        raise NotImplementedError

    def draw_context(self, rng: np.random.Generator, pools: dict[str, _Pool]) -> dict[str, Any]:
        """The per-problem context shared by a problem's 4 images (N, a shared shape...)."""
        return {}

    def build(
        self, values: dict[str, bool], ctx: dict[str, Any], rng: np.random.Generator, pools
    ) -> Scene:
        """A scene meant to have ``values`` (raises PlacementError when shapes do not fit)."""
        raise NotImplementedError

    def evaluate(self, scene: Scene, ctx: dict[str, Any]) -> dict[str, bool] | None:
        """The predicate values of a scene measured on its raster; None if it is invalid."""
        raise NotImplementedError

    def flip(
        self, scene: Scene, flip: str, ctx: dict[str, Any], rng: np.random.Generator, pools
    ) -> Scene:
        """The same scene with ``flip`` negated by moving (or adding/removing) one object."""
        raise NotImplementedError

    # --- generic
    def count(self, scene: Scene) -> int:
        """Number of objects in a scene."""
        return len(scene.objects)

    def scene(
        self,
        values: dict[str, bool],
        ctx: dict[str, Any],
        rng: np.random.Generator,
        pools,
        tries: int = 40,
    ) -> Scene:
        """A scene whose raster-measured values equal ``values`` (raises PlacementError)."""
        for _ in range(tries):
            try:
                s = self.build(values, ctx, rng, pools)
            except PlacementError:
                continue
            if self.evaluate(s, ctx) == values:
                s.colours = list(random_colours(rng, (len(s.objects),)))
                return s
        raise PlacementError(f"no scene with {values} after {tries} tries")

    def _sep(self, occ: np.ndarray, gap: int | None = None) -> np.ndarray:
        """Pixels at Chebyshev distance >= gap from every ``occ`` pixel."""
        return ~dilate(occ, (self.cfg.gap if gap is None else gap) - 1)

    def _place(self, scene: Scene, shape: Shape, rng, role: str, **constraints) -> SceneObject:
        off = _choose(rng, fit_offsets(shape, self.size, **constraints))
        if off is None:
            raise PlacementError(f"no room for a {role}")
        obj = SceneObject(shape, off[0], off[1], role)
        scene.objects.append(obj)
        return obj

    def _nest(self, big: Shape, small: Shape, rng, contact: bool = False) -> tuple[int, int]:
        """Where ``small`` sits inside ``big``'s local box: inside, touching it or not."""
        t = big.h, big.w
        bm, bi = big.mask, big.interior
        if contact:
            cons = {"allowed": bi, "touch": dilate(bm, 1)}
        else:
            cons = {"allowed": bi & self._sep(bm, self.cfg.inside_gap)}
        off = _choose(rng, fit_offsets(small, self.size, box=t, **cons))
        if off is None:
            raise PlacementError("inner object does not fit its container")
        return off

    def _nested_pair(
        self, pool: _Pool, rng, contact: bool = False, tries: int = 12
    ) -> tuple[Shape, Shape, int, int]:
        """A (big, small) pair from ``pool`` whose small fits inside the big, and its offset.

        Pairs whose small does not fit are replaced by the pool's next pair (up to ``tries``).
        """
        for _ in range(tries):
            big, small = pool.next()
            try:
                dy, dx = self._nest(big, small, rng, contact)
            except PlacementError:
                continue
            return big, small, dy, dx
        raise PlacementError("no drawn pair nests")

    def _place_pair(
        self, scene: Scene, big: Shape, small: Shape, dy: int, dx: int, rng, **constraints
    ) -> None:
        """Place a nested pair (small at ``(dy, dx)`` in big's box) as two objects."""
        both = Shape.union(big, small, dy, dx)
        off = _choose(rng, fit_offsets(both, self.size, **constraints))
        if off is None:
            raise PlacementError("no room for a pair")
        scene.objects.append(SceneObject(big, off[0], off[1], "big"))
        scene.objects.append(SceneObject(small, off[0] + dy, off[1] + dx, "small"))

    @staticmethod
    def _union(masks: np.ndarray) -> np.ndarray:
        return masks.any(0) if len(masks) else np.zeros(masks.shape[1:], bool)


def _uniform(lo_hi: tuple[float, float]):
    return lambda rng, n: rng.uniform(lo_hi[0], lo_hi[1], n)


class InsideContactWorld(ShapeWorld):
    """Two objects: a big outer and a small inner; predicates ``inside`` and ``contact``."""

    predicates = ("inside", "contact")
    default_size = 32

    def __init__(self, cfg: WorldConfig | None = None) -> None:
        super().__init__(cfg)
        small = self.size < 64
        if self.cfg.outer_size is None:
            self.cfg.outer_size = (0.45, 0.75) if small else (0.25, 0.5)
        if self.cfg.inner_ratio is None:
            self.cfg.inner_ratio = (0.28, 0.40) if small else (0.25, 0.40)

    def pools(self, rng):
        lo, hi = self.cfg.outer_size
        rlo, rhi = self.cfg.inner_ratio

        def sizes(rng, n):
            outer = rng.uniform(lo, hi, n) * self.size
            return np.stack([outer, outer * rng.uniform(rlo, rhi, n)], 1)

        return {"pair": _Pool(rng, sizes, self.cfg)}

    def _inner_constraints(self, outer_mask, outer_inner, values) -> dict[str, np.ndarray]:
        gap = self.cfg.inside_gap if values["inside"] else self.cfg.gap
        region = outer_inner if values["inside"] else ~outer_mask & ~outer_inner
        if values["contact"]:
            return {"allowed": region & ~outer_mask, "touch": dilate(outer_mask, 1)}
        return {"allowed": region & self._sep(outer_mask, gap)}

    def build(self, values, ctx, rng, pools):
        if values["inside"]:
            scene = Scene(self.size)
            big, small, dy, dx = self._nested_pair(pools["pair"], rng, values["contact"])
            self._place_pair(scene, big, small, dy, dx, rng)
            return scene
        outer_shape, inner_shape = pools["pair"].next()
        for _ in range(4):
            scene = Scene(self.size)
            outer = self._place(scene, outer_shape, rng, "outer")
            om = _stamp(outer_shape.pix, outer, self.size)
            oi = _stamp(outer_shape.inner, outer, self.size)
            cons = self._inner_constraints(om, oi, values)
            try:
                self._place(scene, inner_shape, rng, "inner", enclose_none=om, **cons)
            except PlacementError:
                continue
            return scene
        raise PlacementError("inner object does not fit")

    def evaluate(self, scene, ctx):
        if len(scene.objects) != 2:
            return None
        rel = relations(scene.masks(), scene.interiors())
        if not rel.valid:
            return None
        return {"inside": bool(rel.contains.any()), "contact": bool(rel.touch[0, 1])}

    def flip(self, scene, flip, ctx, rng, pools):
        values = self.evaluate(scene, ctx)
        if values is None or flip not in values:
            raise PlacementError(f"cannot flip {flip!r}")
        values = dict(values)
        values[flip] = not values[flip]
        new = scene.copy()
        outer, inner = new.objects
        om = _stamp(outer.shape.pix, outer, self.size)
        oi = _stamp(outer.shape.inner, outer, self.size)
        new.objects = [outer]
        self._place(
            new,
            inner.shape,
            rng,
            "inner",
            enclose_none=om,
            **self._inner_constraints(om, oi, values),
        )
        return new


class NumberContactWorld(ShapeWorld):
    """N copies of one shape (N per problem); predicates ``number`` and ``contact``."""

    predicates = ("number", "contact")
    relational = True
    default_size = 32
    n_choices: tuple[int, ...] = (2, 3)

    def __init__(self, cfg: WorldConfig | None = None) -> None:
        super().__init__(cfg)
        if self.cfg.outer_size is None:
            self.cfg.outer_size = (0.2, 0.32) if self.size < 64 else (0.15, 0.28)

    def pools(self, rng):
        lo, hi = self.cfg.outer_size
        return {"shape": _Pool(rng, lambda r, n: r.uniform(lo, hi, (n, 1)) * self.size, self.cfg)}

    def draw_context(self, rng, pools):
        return {"n": int(rng.choice(self.n_choices)), "shape": pools["shape"].next()[0]}

    def _count(self, values, n, rng) -> int:
        if values["number"]:
            return n
        options = [c for c in (n - 1, n + 1) if c >= 2]
        return int(rng.choice(options))

    def _add(self, scene, shape, rng, touching: bool, avoid: np.ndarray | None = None) -> None:
        masks = scene.masks()
        occ, inn = self._union(masks), self._union(scene.interiors())
        if not len(scene.objects):
            self._place(scene, shape, rng, "object")
            return
        allowed = ~inn & (~occ if touching else self._sep(occ))
        if avoid is not None:
            allowed &= self._sep(avoid)
        touch = dilate(occ if avoid is None else occ & ~avoid, 1) if touching else None
        self._place(scene, shape, rng, "object", allowed=allowed, touch=touch, enclose_none=occ)

    def build(self, values, ctx, rng, pools):
        c = self._count(values, ctx["n"], rng)
        scene = Scene(self.size)
        clump = c if values["contact"] else c - 1
        for _ in range(clump):
            self._add(scene, ctx["shape"], rng, touching=True)
        if not values["contact"]:
            self._add(scene, ctx["shape"], rng, touching=False)
        return scene

    def evaluate(self, scene, ctx):
        k = len(scene.objects)
        if k < 2:
            return None
        rel = relations(scene.masks(), scene.interiors())
        if not rel.valid or rel.contains.any():
            return None
        return {"number": k == ctx["n"], "contact": connected(rel.touch)}

    def flip(self, scene, flip, ctx, rng, pools):
        rel = relations(scene.masks(), scene.interiors())
        k = len(scene.objects)
        order = [int(i) for i in rng.permutation(k)]
        if flip == "contact":
            want_touch = not connected(rel.touch)
            for j in order:
                rest = [i for i in range(k) if i != j]
                if not connected(rel.touch[np.ix_(rest, rest)]):
                    continue
                new = scene.copy()
                obj = new.objects.pop(j)
                colour = new.colours.pop(j)
                try:
                    self._add(new, obj.shape, rng, touching=want_touch)
                except PlacementError:
                    continue
                new.colours.append(colour)
                return new
            raise PlacementError("no object can be moved to flip contact")
        if flip != "number":
            raise PlacementError(f"cannot flip {flip!r}")
        n = ctx["n"]
        is_clump = connected(rel.touch)
        # the object outside the main clump (when contact is False) stays where it is
        sep = None
        if not is_clump:
            degrees = rel.touch.sum(1)
            loners = [i for i in range(k) if degrees[i] == 0]
            if len(loners) != 1:
                raise PlacementError("not a clump plus one separate object")
            sep = loners[0]
        new = scene.copy()
        if k != n:  # restore N
            target = n
        else:
            target = int(rng.choice([c for c in (n - 1, n + 1) if c >= 2]))
        if target == k + 1:
            avoid = new.mask(sep) if sep is not None else None
            self._add(new, ctx["shape"], rng, touching=True, avoid=avoid)
            new.colours.append(random_colours(rng, (1,))[0])
            return new
        if target == k - 1:
            clump = [i for i in order if i != sep]
            for j in clump:
                rest = [i for i in clump if i != j]
                if rest and connected(rel.touch[np.ix_(rest, rest)]):
                    new.objects.pop(j)
                    new.colours.pop(j)
                    return new
        raise PlacementError("cannot flip number")


class InsideNumberWorld(ShapeWorld):
    """N nested pairs (N per problem); predicates ``inside`` and ``number``."""

    predicates = ("inside", "number")
    relational = True
    default_size = 40
    n_choices: tuple[int, ...] = (2, 3)

    def __init__(self, cfg: WorldConfig | None = None) -> None:
        super().__init__(cfg)
        small = self.size < 64
        if self.cfg.outer_size is None:
            self.cfg.outer_size = (0.28, 0.38) if small else (0.18, 0.3)
        if self.cfg.inner_ratio is None:
            self.cfg.inner_ratio = (0.32, 0.45) if small else (0.25, 0.4)

    def pools(self, rng):
        lo, hi = self.cfg.outer_size
        rlo, rhi = self.cfg.inner_ratio

        def sizes(rng, n):
            big = rng.uniform(lo, hi, n) * self.size
            return np.stack([big, big * rng.uniform(rlo, rhi, n)], 1)

        return {"pair": _Pool(rng, sizes, self.cfg)}

    def draw_context(self, rng, pools):
        return {"n": int(rng.choice(self.n_choices))}

    def _layout(self, values, n, rng) -> tuple[int, int, int]:
        """(nested pairs, loose bigs, loose smalls) for the requested values."""
        if values["inside"] and values["number"]:
            return n, 0, 0
        if values["inside"]:
            return int(rng.choice([p for p in (n - 1, n + 1) if p >= 1])), 0, 0
        if values["number"]:
            return n - 1, 1, 1
        c = int(rng.choice([2 * n - 1, 2 * n + 1]))
        big = bool(rng.integers(2))
        return (c - 1) // 2, int(big), int(not big)

    def _free(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        occ = self._union(scene.masks())
        return occ, self._sep(occ) & ~self._union(scene.interiors())

    def _add_pair(self, scene: Scene, rng, pools) -> None:
        big, small, dy, dx = self._nested_pair(pools["pair"], rng)
        occ, allowed = self._free(scene)
        self._place_pair(scene, big, small, dy, dx, rng, allowed=allowed, enclose_none=occ)

    def _add_loose(self, scene: Scene, shape: Shape, role: str, rng) -> None:
        occ, allowed = self._free(scene)
        self._place(scene, shape, rng, role, allowed=allowed, enclose_none=occ)

    def build(self, values, ctx, rng, pools):
        pairs, bigs, smalls = self._layout(values, ctx["n"], rng)
        scene = Scene(self.size)
        for _ in range(pairs):
            self._add_pair(scene, rng, pools)
        for _ in range(bigs):
            self._add_loose(scene, pools["pair"].next()[0], "big", rng)
        for _ in range(smalls):
            self._add_loose(scene, pools["pair"].next()[1], "small", rng)
        return scene

    def evaluate(self, scene, ctx):
        k = len(scene.objects)
        if k < 1:
            return None
        rel = relations(scene.masks(), scene.interiors())
        if not rel.valid or rel.touch.any():
            return None
        links = rel.contains.sum(0) + rel.contains.sum(1)
        return {"inside": bool((links == 1).all()), "number": k == 2 * ctx["n"]}

    def flip(self, scene, flip, ctx, rng, pools):
        rel = relations(scene.masks(), scene.interiors())
        k = len(scene.objects)
        links = rel.contains.sum(0) + rel.contains.sum(1)
        loose = [i for i in range(k) if links[i] == 0]
        new = scene.copy()
        if flip == "inside":
            if len(loose) == 2:  # a loose big and a loose small: move the small into the big
                a, b = loose
                big, small = (
                    (a, b)
                    if len(scene.objects[a].shape.inner) > len(scene.objects[b].shape.inner)
                    else (b, a)
                )
                bo, so = new.objects[big], new.objects[small]
                dy, dx = self._nest(bo.shape, so.shape, rng)
                so.y, so.x = bo.y + dy, bo.x + dx
                return new
            if not loose:  # take one pair apart: move its small out
                inners = [j for j in range(k) if rel.contains[:, j].any()]
                j = inners[int(rng.integers(len(inners)))]
                obj = new.objects[j]
                rest = Scene(self.size, [o for i, o in enumerate(new.objects) if i != j])
                occ, allowed = self._free(rest)
                off = _choose(
                    rng, fit_offsets(obj.shape, self.size, allowed=allowed, enclose_none=occ)
                )
                if off is None:
                    raise PlacementError("no room to move a small object out")
                obj.y, obj.x = off
                return new
            raise PlacementError("cannot flip inside")
        if flip != "number":
            raise PlacementError(f"cannot flip {flip!r}")
        n = ctx["n"]
        if k % 2:
            raise PlacementError("cannot flip number with an odd object count")
        target = (
            2 * n if k != 2 * n else int(rng.choice([p for p in (2 * n - 2, 2 * n + 2) if p >= 2]))
        )
        if target == k + 2:
            self._add_pair(new, rng, pools)
            new.colours += list(random_colours(rng, (2,)))
            return new
        if target == k - 2:
            pairs = [(i, j) for i in range(k) for j in range(k) if rel.contains[i, j]]
            if not pairs:
                raise PlacementError("no pair to remove")
            i, j = pairs[int(rng.integers(len(pairs)))]
            keep = [m for m in range(k) if m not in (i, j)]
            new.objects = [new.objects[m] for m in keep]
            new.colours = [new.colours[m] for m in keep]
            return new
        raise PlacementError("cannot flip number")


WORLDS: dict[str, type[ShapeWorld]] = {
    "inside_contact": InsideContactWorld,
    "number_contact": NumberContactWorld,
    "inside_number": InsideNumberWorld,
}
