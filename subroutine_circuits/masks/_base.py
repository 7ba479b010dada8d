"""Shared machinery of unit and weight masks: a list of parametrised parts with labels."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from jaxtyping import Bool, Float
from torch import Tensor

from .parametrization import (
    ContinuousSparsification,
    FixedMask,
    MaskConfig,
    make_parametrization,
)


class hybridmethod:
    """Decorator: ``Cls.f(obj, *a)`` and ``obj.f(*a)`` both call ``f(obj, *a)``.

    Lets ``UnitMask.random_like(mask, seed)`` and ``mask.random_like(seed=...)`` coexist.
    """

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self.func
        return functools.partial(self.func, obj)


class MaskBase(nn.Module):
    """A mask made of one parametrisation per part (hook group or parameter tensor).

    Subclasses set ``self.labels`` (one string per part, used in error messages), ``self.layers``
    and ``self.kinds`` (for :meth:`stats`), and call :meth:`_build_parts`.
    """

    cfg: MaskConfig
    labels: list[str]
    layers: list[int]
    kinds: list[str]

    def _build_parts(
        self,
        shapes: Sequence[tuple[int, ...]],
        cfg: MaskConfig,
        fixed: Bool[Tensor, "n"] | None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Create ``self.parts`` (trainable, or fixed from the flat boolean vector ``fixed``).

        Hard-concrete parts draw from ``generator`` (default: a new one seeded with ``cfg.seed``).
        """
        if generator is None:
            generator = torch.Generator().manual_seed(int(cfg.seed))
        self.generator = generator
        self.shapes = [tuple(int(s) for s in sh) for sh in shapes]
        self.is_fixed = fixed is not None
        if fixed is None:
            parts = [make_parametrization(sh, cfg, self.generator) for sh in self.shapes]
        else:
            pieces = self._split_flat(fixed)
            parts = [FixedMask(p) for p in pieces]
        self.parts = nn.ModuleList(parts)

    # ------------------------------------------------------------------ flat <-> parts
    @property
    def n_total(self) -> int:
        """Total number of mask entries (units or weights)."""
        total = 0
        for sh in self.shapes:
            n = 1
            for s in sh:
                n *= s
            total += n
        return total

    def _split_flat(self, flat: Bool[Tensor, "n"]) -> list[Bool[Tensor, "..."]]:
        """Cut a flat boolean vector into per-part tensors of ``self.shapes``."""
        flat = torch.as_tensor(flat)
        if flat.dim() != 1 or flat.numel() != self.n_total:
            raise ValueError(
                f"flat mask has shape {tuple(flat.shape)}, expected a 1-D tensor of "
                f"{self.n_total} entries"
            )
        if flat.dtype != torch.bool:
            uniq = torch.unique(flat)
            if not all(float(v) in (0.0, 1.0) for v in uniq):
                raise ValueError("flat mask must be boolean (or 0/1 valued)")
            flat = flat.bool()
        out, start = [], 0
        for sh in self.shapes:
            n = 1
            for s in sh:
                n *= s
            out.append(flat[start : start + n].reshape(sh))
            start += n
        return out

    # ------------------------------------------------------------------ queries
    def flat_binary(self) -> Bool[Tensor, "n"]:
        """The deterministic binary mask over all entries, in part order (flattened)."""
        return torch.cat([p.binary().reshape(-1).cpu() for p in self.parts])

    def drop(self, off: Bool[Tensor, "n"]) -> None:
        """Turn off, in place, the entries where the flat boolean ``off`` is True (part order,
        as :meth:`flat_binary`); every other entry keeps its binary value."""
        off = torch.as_tensor(off).bool().reshape(-1).cpu()
        pieces = self._split_flat(off)
        for part, piece in zip(self.parts, pieces):
            if bool(piece.any()):
                part.drop(piece)

    def density(self) -> float:
        """Fraction of entries kept by the binary mask."""
        flat = self.flat_binary()
        return int(flat.sum()) / max(1, flat.numel())

    def _sum_parts(self, name: str) -> Float[Tensor, ""]:
        """The sum over parts of their method ``name`` (a scalar tensor; 0 without parts)."""
        total = None
        for p in self.parts:
            val = getattr(p, name)()
            total = val if total is None else total + val
        return total if total is not None else torch.zeros(())

    def penalty(self) -> Float[Tensor, ""]:
        """Sum of the parts' sparsity penalties (expected L0 / sum of sigmoids)."""
        return self._sum_parts("penalty")

    def soft_count(self) -> Float[Tensor, ""]:
        """Sum of the parts' differentiable counts of binary-kept entries (what a target
        density constrains; ``parametrization.*.soft_count``)."""
        return self._sum_parts("soft_count")

    def expected_l0(self) -> float:
        """Expected number of kept entries summed over parts."""
        return float(sum(float(p.expected_l0()) for p in self.parts))

    def step_temperature(self) -> float | None:
        """Anneal continuous-sparsification temperatures; returns the new T (None if n/a)."""
        new_t = None
        for p in self.parts:
            if isinstance(p, ContinuousSparsification):
                new_t = p.step_temperature()
        return new_t

    def check_finite(self) -> None:
        """Raise ValueError naming the part whose parameters contain NaN/inf."""
        for label, p in zip(self.labels, self.parts):
            p.check_finite(label)

    def stats(self) -> list[dict]:
        """Per (layer, kind): ``n``, ``kept``, ``density`` and ``expected_l0``."""
        rows: dict[tuple[int, str], dict] = {}
        for layer, kind, p in zip(self.layers, self.kinds, self.parts):
            b = p.binary()
            key = (layer, kind)
            row = rows.setdefault(
                key, {"layer": layer, "kind": kind, "n": 0, "kept": 0, "expected_l0": 0.0}
            )
            row["n"] += int(b.numel())
            row["kept"] += int(b.sum())
            row["expected_l0"] += float(p.expected_l0())
        out = []
        for row in rows.values():
            row["density"] = row["kept"] / row["n"] if row["n"] else 0.0
            out.append(row)
        return out

    # ------------------------------------------------------------------ random masks
    def _random_flat(self, seed: int, per_part: bool) -> Bool[Tensor, "n"]:
        """A random flat mask keeping as many entries as this one (overall or per part)."""
        g = torch.Generator().manual_seed(int(seed))
        flat = self.flat_binary()
        out = torch.zeros_like(flat)
        if not per_part:
            k = int(flat.sum())
            out[torch.randperm(flat.numel(), generator=g)[:k]] = True
            return out
        start = 0
        for piece in self._split_flat(flat):
            n = piece.numel()
            k = int(piece.sum())
            idx = torch.randperm(n, generator=g)[:k] + start
            out[idx] = True
            start += n
        return out


_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(name: str) -> int:
    """The first integer component of a dotted name (``blocks.3.attn.W_Q`` -> 3), else -1."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else -1
