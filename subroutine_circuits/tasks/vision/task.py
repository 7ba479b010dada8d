"""Image tasks: odd-one-out problems, splits and minimal pairs over the shape worlds.

The problem semantics are those of the language tasks (``tasks/base.py``), derived from the
predicates by the same ``_kind_spec``:

- ``composite``: the 3 positives satisfy every rule predicate; the odd one breaks A only, B only
  or both (one third each, balanced to within one problem);
- ``sub_<p>``: positives satisfy ``p`` and are random on the other predicates; the odd one breaks
  ``p`` and is random on the others;
- ``partition_<p>``: positives satisfy every rule predicate; the odd one breaks only ``p``.

Number is relational: each problem draws a context (N, and for Number-Contact one shape and
size) shared by its 4 images, and ``number`` means "has the problem's N". The odd position is
uniform (balanced over the problems, shuffled). Every image is a scene whose predicate values
were measured on its own raster before it was accepted (see ``scenes.py``).

Splits use independent random streams per (task, seed, split, kind), and a scene (label map)
that already occurs in an earlier split is redrawn, so no scene is shared across splits.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from subroutine_circuits.tasks.base import SPLITS, Task, _kind_spec, _unknown_kind
from subroutine_circuits.tasks.vision.scenes import (
    WORLDS,
    PlacementError,
    Scene,
    ShapeWorld,
    WorldConfig,
)
from subroutine_circuits.tasks.vision.shapes import render_labels

if TYPE_CHECKING:
    from jaxtyping import Bool, Float, Int, UInt8
    from torch import Tensor

NORM_MEAN: float = 0.9
NORM_STD: float = 0.1


def images_to_tensor(images: np.ndarray, device=None) -> Tensor:
    """uint8 images ``[..., h, w, 3]`` -> float32 ``[..., 3, h, w]``, ``(x/255 - 0.9) / 0.1``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device)
    x = x.movedim(-1, -3).float().div_(255.0)
    return x.sub_(NORM_MEAN).div_(NORM_STD)


def _scene_key(labels: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(labels).tobytes(), digest_size=16).digest()


@dataclass
class ImageProblems:
    """A batch of odd-one-out image problems of one kind.

    ``images[b, i]`` is image i of problem b (white background, coloured 1-px outlines),
    ``labels[b, i]`` its label map (0 background, k object k), ``odd[b]`` the odd position,
    ``values[b, i, j]`` predicate ``predicates[j]`` of that image, ``counts[b, i]`` its number of
    objects and ``context_n[b]`` the problem's N (0 for tasks without a number predicate).
    """

    images: UInt8[np.ndarray, "b 4 h w 3"]
    labels: UInt8[np.ndarray, "b 4 h w"]
    odd: Int[np.ndarray, " b"]
    values: Bool[np.ndarray, "b 4 p"]
    counts: Int[np.ndarray, "b 4"]
    context_n: Int[np.ndarray, " b"]
    predicates: tuple[str, ...]
    kind: str
    task: str = ""

    def __len__(self) -> int:
        return int(self.odd.shape[0])

    @property
    def image_size(self) -> int:
        """Side of the square images in pixels."""
        return int(self.images.shape[2])

    def to_tensor(self, device=None) -> Float[Tensor, "b 4 3 h w"]:
        """The images as a normalised float32 tensor (mean 0.9, std 0.1), channels first."""
        return images_to_tensor(self.images, device)

    def odd_tensor(self, device=None) -> Int[Tensor, " b"]:
        """The odd positions as an int64 tensor (the 4-way classification targets)."""
        import torch

        return torch.as_tensor(self.odd, dtype=torch.long, device=device)

    def value_dicts(self, b: int) -> list[dict[str, bool]]:
        """Problem b's predicate values as 4 dicts."""
        return [
            {p: bool(self.values[b, i, j]) for j, p in enumerate(self.predicates)} for i in range(4)
        ]

    def subset(self, idx: Sequence[int] | slice | np.ndarray) -> ImageProblems:
        """The problems at ``idx`` (numpy indexing)."""
        return ImageProblems(
            images=self.images[idx],
            labels=self.labels[idx],
            odd=self.odd[idx],
            values=self.values[idx],
            counts=self.counts[idx],
            context_n=self.context_n[idx],
            predicates=self.predicates,
            kind=self.kind,
            task=self.task,
        )

    def to_json(self, b: int) -> dict[str, Any]:
        """Labels of problem b as a JSON-serialisable dict (one line of the exported JSONL)."""
        return {
            "index": int(b),
            "task": self.task,
            "kind": self.kind,
            "odd_index": int(self.odd[b]),
            "values": self.value_dicts(b),
            "counts": [int(c) for c in self.counts[b]],
            "n": int(self.context_n[b]),
        }

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        """Arrays for ``np.savez_compressed``."""
        return {
            "images": self.images,
            "labels": self.labels,
            "odd": self.odd,
            "values": self.values,
            "counts": self.counts,
            "context_n": self.context_n,
            "predicates": np.array(self.predicates),
            "kind": np.array(self.kind),
            "task": np.array(self.task),
        }

    @classmethod
    def from_npz(cls, data: Mapping[str, np.ndarray]) -> ImageProblems:
        """Inverse of :meth:`to_npz_dict` (e.g. on ``np.load(path)``)."""
        for key in ("images", "labels", "odd", "values", "counts", "context_n", "predicates"):
            if key not in data:
                raise ValueError(f"image-problem archive lacks the array {key!r}")
        return cls(
            images=np.asarray(data["images"]),
            labels=np.asarray(data["labels"]),
            odd=np.asarray(data["odd"]),
            values=np.asarray(data["values"]),
            counts=np.asarray(data["counts"]),
            context_n=np.asarray(data["context_n"]),
            predicates=tuple(str(p) for p in data["predicates"]),
            kind=str(data["kind"]) if "kind" in data else "",
            task=str(data["task"]) if "task" in data else "",
        )


@dataclass
class ImagePairs:
    """Minimal pairs for patching: ``corrupted[i]`` is ``clean[i]`` with ``flip`` negated.

    ``clean`` has ``clean_values`` (by default the rule with ``flip`` broken); ``corrupted`` is
    the same scene with one object moved (or, for number, one object or nested pair added or
    removed), so it has ``flip`` restored and every other predicate unchanged. ``contexts[i]``
    are ``n_context`` images that satisfy the rule and share pair i's problem context (N).
    """

    clean: UInt8[np.ndarray, "n h w 3"]
    corrupted: UInt8[np.ndarray, "n h w 3"]
    contexts: UInt8[np.ndarray, "n c h w 3"]
    clean_labels: UInt8[np.ndarray, "n h w"]
    corrupted_labels: UInt8[np.ndarray, "n h w"]
    context_labels: UInt8[np.ndarray, "n c h w"]
    clean_values: Bool[np.ndarray, "n p"]
    corrupted_values: Bool[np.ndarray, "n p"]
    context_n: Int[np.ndarray, " n"]
    predicates: tuple[str, ...]
    flip: str
    task: str = ""

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def to_tensors(self, device=None) -> dict[str, Tensor]:
        """``clean``/``corrupted`` ``[n, 3, h, w]`` and ``contexts`` ``[n, c, 3, h, w]``."""
        return {
            "clean": images_to_tensor(self.clean, device),
            "corrupted": images_to_tensor(self.corrupted, device),
            "contexts": images_to_tensor(self.contexts, device),
        }


@dataclass
class _Stream:
    """One seeded random stream with its template pools."""

    world: ShapeWorld
    rng: np.random.Generator
    pools: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pools = self.world.pools(self.rng)


def _stream_seed(*parts: Any) -> list[int]:
    return [zlib.crc32(str(p).encode()) for p in parts]


class ImageTask:
    """A compositional image task over one shape world.

    ``name``, ``predicates`` (A, B), ``rule`` (the values the positives share), ``description``
    and ``image_size`` (the default side in pixels). Problem kinds and their semantics are those
    of the language tasks.
    """

    modality: str = "image"

    def __init__(
        self,
        name: str,
        world: type[ShapeWorld],
        description: str,
        rule: Mapping[str, bool] | None = None,
        image_size: int | None = None,
        cfg: WorldConfig | None = None,
    ) -> None:
        self.name = name
        self.world_cls = world
        self.predicates: tuple[str, ...] = tuple(world.predicates)
        self.description = description
        self.cfg = cfg
        self.image_size = int(image_size or (cfg.image_size if cfg else world.default_size))
        self.rule: dict[str, bool] = {p: True for p in self.predicates}
        if rule is not None:
            self.rule = self._checked_rule(rule)
        self._worlds: dict[int, ShapeWorld] = {}

    # ----- shared with the language tasks
    def check_values(self, values: Mapping[str, bool], what: str = "values") -> dict[str, bool]:
        """Validate a (partial) predicate assignment; unknown predicates raise ValueError."""
        return Task.check_values(self, values, what)  # type: ignore[arg-type]

    def problem_kinds(self, rule: Mapping[str, bool] | None = None) -> list[str]:
        """``["composite", "sub_<p>"..., "partition_<p>"...]`` for the predicates of the rule."""
        return Task.problem_kinds(self, rule)  # type: ignore[arg-type]

    def _checked_rule(self, rule: Mapping[str, bool]) -> dict[str, bool]:
        checked = self.check_values(rule, what="rule")
        if not checked:
            raise ValueError(f"the rule of task {self.name!r} must name at least one predicate")
        return checked

    def with_rule(self, rule: Mapping[str, bool] | None) -> ImageTask:
        """A copy of this task with another rule (``None``: unchanged)."""
        if rule is None:
            return self
        return ImageTask(
            self.name, self.world_cls, self.description, rule, self.image_size, self.cfg
        )

    def to_json(self) -> dict[str, Any]:
        """Name, predicates, rule, description, modality and default image size."""
        from subroutine_circuits.tasks.base import Task

        return {
            **Task.to_json(self),  # type: ignore[arg-type]
            "modality": self.modality,
            "image_size": self.image_size,
        }

    def __repr__(self) -> str:
        return f"ImageTask(name={self.name!r}, rule={self.rule!r}, image_size={self.image_size})"

    # ----- worlds and streams
    def world(self, image_size: int | None = None) -> ShapeWorld:
        """The shape world drawing this task's scenes at ``image_size`` (default: the task's)."""
        size = int(image_size or self.image_size)
        if size not in self._worlds:
            if self.cfg is not None:
                cfg = WorldConfig(**{**self.cfg.__dict__, "image_size": size})
            else:
                cfg = WorldConfig(image_size=size)
            self._worlds[size] = self.world_cls(cfg)
        return self._worlds[size]

    def _stream(self, image_size: int | None, *parts: Any) -> _Stream:
        world = self.world(image_size)
        rng = np.random.default_rng(_stream_seed(self.name, world.size, *parts))
        return _Stream(world, rng)

    def _problem_scenes(
        self, st: _Stream, wants: list[dict[str, bool]], exclude: set[bytes] | None, tries: int = 30
    ) -> tuple[list[Scene], dict[str, Any]]:
        """4 distinct scenes with the wanted values sharing one freshly drawn context."""
        for _ in range(tries):
            ctx = st.world.draw_context(st.rng, st.pools)
            try:
                scenes = [st.world.scene(v, ctx, st.rng, st.pools) for v in wants]
            except PlacementError:
                continue
            keys = [_scene_key(s.label_map()) for s in scenes]
            if len(set(keys)) < len(keys) or (exclude and any(k in exclude for k in keys)):
                continue
            return scenes, ctx
        raise ValueError(
            f"task {self.name!r}: could not draw scenes with {wants} at "
            f"{st.world.size} px after {tries} contexts; use a larger image size"
        )

    # ----- problems
    def make_problems(
        self,
        kind: str,
        n: int,
        seed: int | np.random.Generator = 0,
        image_size: int | None = None,
        rule: Mapping[str, bool] | None = None,
        exclude: set[bytes] | None = None,
        _stream_parts: tuple = (),
    ) -> ImageProblems:
        """``n`` odd-one-out problems of one kind (semantics in the module docstring).

        ``seed`` is an int (a stream of its own) or a numpy Generator. ``exclude``: label-map
        keys (see :func:`scene_keys`) that must not occur (used to keep splits disjoint).
        """
        if n < 0:
            raise ValueError(f"number of problems must be >= 0, got {n}")
        rule = self._checked_rule(self.rule if rule is None else rule)
        fixed, odd_options = _kind_spec(self, kind, rule)  # type: ignore[arg-type]
        if isinstance(seed, np.random.Generator):
            st = _Stream(self.world(image_size), seed)
        else:
            st = self._stream(image_size, int(seed), kind, *_stream_parts)
        world = st.world
        prng = random.Random(int(st.rng.integers(2**63)))
        option_ids = [i % len(odd_options) for i in range(n)]
        prng.shuffle(option_ids)
        positions = [i % 4 for i in range(n)]
        prng.shuffle(positions)
        size, p = world.size, len(self.predicates)
        labels = np.zeros((n, 4, size, size), np.uint8)
        colours: list[list[np.ndarray]] = []
        values = np.zeros((n, 4, p), bool)
        counts = np.zeros((n, 4), np.int64)
        ctx_n = np.zeros(n, np.int64)
        k_max = 1
        for b in range(n):
            wants = []
            for pos in range(4):
                want = odd_options[option_ids[b]] if pos == positions[b] else fixed
                wants.append(
                    {q: want[q] if q in want else prng.random() < 0.5 for q in self.predicates}
                )
            scenes, ctx = self._problem_scenes(st, wants, exclude)
            ctx_n[b] = int(ctx.get("n", 0))
            row = []
            for i, (s, v) in enumerate(zip(scenes, wants)):
                labels[b, i] = s.label_map()
                values[b, i] = [v[q] for q in self.predicates]
                counts[b, i] = len(s.objects)
                row.append(s)
                k_max = max(k_max, len(s.objects))
            colours.append(row)
        pal = np.full((n, 4, k_max, 3), 255, np.uint8)
        for b, row in enumerate(colours):
            for i, s in enumerate(row):
                pal[b, i] = s.colour_array(k_max)
        images = render_labels(labels, pal)
        return ImageProblems(
            images=images,
            labels=labels,
            odd=np.asarray(positions, np.int64),
            values=values,
            counts=counts,
            context_n=ctx_n,
            predicates=self.predicates,
            kind=kind,
            task=self.name,
        )

    def make_splits(
        self,
        n_per_kind: int | Mapping[str, int] | Sequence[int],
        seed: int = 0,
        image_size: int | None = None,
        rule: Mapping[str, bool] | None = None,
        split_sizes: Sequence[float] = (1.0, 0.25, 0.25),
    ) -> dict[str, dict[str, ImageProblems]]:
        """Seeded train/val/test problems of every kind: ``splits[split][kind]``.

        ``n_per_kind``: an int (train problems per kind; val and test get ``split_sizes``
        multiples, default a quarter), a ``(n_train, n_val, n_test)`` triple for every kind, or a
        dict kind -> train count (kinds left out get none). No scene occurs in two splits.
        """
        rule = self._checked_rule(self.rule if rule is None else rule)
        kinds = self.problem_kinds(rule)
        if isinstance(n_per_kind, Mapping):
            for k in n_per_kind:
                if k not in kinds:
                    raise ValueError(_unknown_kind(self, k, rule))  # type: ignore[arg-type]
            per_kind = {k: int(v) for k, v in n_per_kind.items()}
            counts = {
                s: {k: int(round(v * f)) for k, v in per_kind.items()}
                for s, f in zip(SPLITS, split_sizes)
            }
        elif isinstance(n_per_kind, Sequence) and not isinstance(n_per_kind, str):
            if len(n_per_kind) != 3:
                raise ValueError(f"give (n_train, n_val, n_test), got {n_per_kind!r}")
            counts = {s: {k: int(c) for k in kinds} for s, c in zip(SPLITS, n_per_kind)}
        else:
            counts = {
                s: {k: int(round(int(n_per_kind) * f)) for k in kinds}
                for s, f in zip(SPLITS, split_sizes)
            }
        for s in SPLITS:
            for k, c in counts[s].items():
                if c < 0:
                    raise ValueError(f"number of {s} problems of kind {k!r} must be >= 0, got {c}")
        seen: set[bytes] = set()
        out: dict[str, dict[str, ImageProblems]] = {}
        for split in SPLITS:
            out[split] = {}
            for kind, c in counts[split].items():
                out[split][kind] = self.make_problems(
                    kind, c, seed, image_size, rule, exclude=seen, _stream_parts=(split,)
                )
            for probs in out[split].values():
                seen.update(scene_keys(probs.labels))
        return out

    # ----- minimal pairs and unlabelled images
    def make_minimal_pairs(
        self,
        flip: str,
        n: int,
        seed: int = 0,
        image_size: int | None = None,
        values: Mapping[str, bool] | None = None,
        n_context: int = 3,
        split: str = "val",
        tries: int = 50,
        allow_fewer: bool = False,
    ) -> ImagePairs:
        """``n`` minimal pairs flipping ``flip`` (see :class:`ImagePairs`).

        ``values``: the clean images' values (default: the rule with ``flip`` broken, so the
        corrupted image satisfies the rule). ``split`` only selects an independent stream.
        A pair that cannot be built in ``tries`` draws raises ValueError, or with
        ``allow_fewer`` ends the drawing: the pairs built so far are returned (possibly none).
        """
        if flip not in self.predicates:
            raise ValueError(
                f"unknown predicate {flip!r} of task {self.name!r}; "
                f"predicates: {', '.join(self.predicates)}"
            )
        if n < 0 or n_context < 0:
            raise ValueError(f"n and n_context must be >= 0, got {n}, {n_context}")
        if values is None:
            values = dict(self.rule)
            values[flip] = not self.rule.get(flip, True)
        values = self.check_values(values)
        st = self._stream(image_size, int(seed), "pairs", flip, split)
        world = st.world
        prng = random.Random(int(st.rng.integers(2**63)))
        size, p = world.size, len(self.predicates)
        rows = []
        for _ in range(n):
            for _try in range(tries):
                clean_v = {
                    q: values[q] if q in values else prng.random() < 0.5 for q in self.predicates
                }
                flipped = dict(clean_v)
                flipped[flip] = not clean_v[flip]
                ctx_v = [
                    {
                        q: self.rule[q] if q in self.rule else prng.random() < 0.5
                        for q in self.predicates
                    }
                    for _c in range(n_context)
                ]
                try:
                    ctx = world.draw_context(st.rng, st.pools)
                    clean = world.scene(clean_v, ctx, st.rng, st.pools)
                    corr = world.flip(clean, flip, ctx, st.rng, st.pools)
                    if world.evaluate(corr, ctx) != flipped:
                        continue
                    contexts = [world.scene(v, ctx, st.rng, st.pools) for v in ctx_v]
                except PlacementError:
                    continue
                rows.append((clean, corr, contexts, clean_v, flipped, int(ctx.get("n", 0))))
                break
            else:
                if allow_fewer:
                    break
                raise ValueError(
                    f"task {self.name!r}: cannot build a minimal pair flipping {flip!r} from "
                    f"{values} after {tries} tries"
                )
        k_max = max([1] + [len(s.objects) for r in rows for s in (r[0], r[1], *r[2])])

        def render(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
            lab = (
                np.stack([s.label_map() for s in scenes])
                if scenes
                else np.zeros((0, size, size), np.uint8)
            )
            pal = (
                np.stack([s.colour_array(k_max) for s in scenes])
                if scenes
                else np.zeros((0, k_max, 3), np.uint8)
            )
            return render_labels(lab, pal), lab

        clean_img, clean_lab = render([r[0] for r in rows])
        corr_img, corr_lab = render([r[1] for r in rows])
        ctx_img, ctx_lab = render([s for r in rows for s in r[2]])
        return ImagePairs(
            clean=clean_img,
            corrupted=corr_img,
            contexts=ctx_img.reshape(len(rows), n_context, size, size, 3),
            clean_labels=clean_lab,
            corrupted_labels=corr_lab,
            context_labels=ctx_lab.reshape(len(rows), n_context, size, size),
            clean_values=np.array([[r[3][q] for q in self.predicates] for r in rows], bool).reshape(
                len(rows), p
            ),
            corrupted_values=np.array(
                [[r[4][q] for q in self.predicates] for r in rows], bool
            ).reshape(len(rows), p),
            context_n=np.array([r[5] for r in rows], np.int64),
            predicates=self.predicates,
            flip=flip,
            task=self.name,
        )

    def sample_images(
        self, n: int, seed: int = 0, image_size: int | None = None, split: str = "train"
    ) -> tuple[UInt8[np.ndarray, "n h w 3"], UInt8[np.ndarray, "n h w"]]:
        """``n`` unlabelled images of every predicate combination (for self-supervised
        pretraining): images and label maps. ``split`` selects an independent stream."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        st = self._stream(image_size, int(seed), "images", split)
        world = st.world
        scenes = []
        while len(scenes) < n:
            ctx = world.draw_context(st.rng, st.pools)
            v = {q: bool(st.rng.integers(2)) for q in self.predicates}
            try:
                scenes.append(world.scene(v, ctx, st.rng, st.pools))
            except PlacementError:
                continue
        k_max = max([1] + [len(s.objects) for s in scenes])
        lab = (
            np.stack([s.label_map() for s in scenes])
            if scenes
            else np.zeros((0, world.size, world.size), np.uint8)
        )
        pal = (
            np.stack([s.colour_array(k_max) for s in scenes])
            if scenes
            else np.zeros((0, k_max, 3), np.uint8)
        )
        return render_labels(lab, pal), lab


def scene_keys(labels: UInt8[np.ndarray, "... h w"]) -> set[bytes]:
    """Digests of every label map in ``labels`` (a scene's identity)."""
    flat = labels.reshape(-1, *labels.shape[-2:])
    return {_scene_key(x) for x in flat}


DESCRIPTIONS: dict[str, str] = {
    "inside_contact": (
        "Inside-Contact: two closed outlines; inside = the small one lies within the big one, "
        "contact = their outlines touch."
    ),
    "number_contact": (
        "Number-Contact: copies of one shape; number = the image has the problem's N (2 or 3) "
        "objects, contact = they form one touching clump."
    ),
    "inside_number": (
        "Inside-Number: big and small outlines; inside = every object is in a nested pair, "
        "number = the image has 2N objects (N = 2 or 3 per problem); nothing touches."
    ),
}


def vision_task(
    name: str,
    image_size: int | None = None,
    rule: Mapping[str, bool] | None = None,
    cfg: WorldConfig | None = None,
) -> ImageTask:
    """A built-in image task by name (``inside_contact``, ``number_contact``, ``inside_number``)."""
    if name not in WORLDS:
        raise ValueError(f"unknown vision task {name!r}; known: {', '.join(WORLDS)}")
    return ImageTask(name, WORLDS[name], DESCRIPTIONS[name], rule, image_size, cfg)
