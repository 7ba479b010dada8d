"""The installed TransformerLens version, read from package metadata (imports nothing heavy)."""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1)
def tl_version() -> tuple[int, ...]:
    """The installed TransformerLens version as integers, e.g. ``(4, 3, 0)`` (no import of it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("transformer-lens")
    except PackageNotFoundError:  # pragma: no cover - the package is a hard dependency
        raise ValueError("transformer-lens is not installed") from None
    parts = []
    for piece in text.split(".")[:3]:
        m = re.match(r"\d+", piece)
        parts.append(int(m.group(0)) if m else 0)
    return tuple(parts)


def tl_major() -> int:
    """Major version of the installed TransformerLens (3 or 4)."""
    return tl_version()[0]
