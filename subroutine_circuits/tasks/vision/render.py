"""Pictures of image problems: a dependency-free PNG encoder and PNG/SVG problem grids."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import UInt8

    from subroutine_circuits.tasks.vision.task import ImageProblems

ODD_FRAME: tuple[int, int, int] = (220, 30, 30)
FRAME: tuple[int, int, int] = (200, 200, 200)


def encode_png(image: UInt8[np.ndarray, "h w 3"] | UInt8[np.ndarray, "h w"]) -> bytes:
    """An 8-bit RGB (or grayscale, for 2-d input) PNG of ``image`` (zlib + struct only)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"encode_png needs a uint8 array, got {img.dtype}")
    if img.ndim == 2:
        colour_type, channels = 0, 1
    elif img.ndim == 3 and img.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"encode_png needs an (h, w) or (h, w, 3) array, got {img.shape}")
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"cannot encode an empty image of shape {img.shape}")
    rows = img.reshape(h, w * channels)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG written by :func:`encode_png` (8-bit, filter 0, not interlaced)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    if header is None:
        raise ValueError("PNG without IHDR")
    w, h, depth, colour_type, _, _, interlace = header
    channels = {0: 1, 2: 3}.get(colour_type)
    if depth != 8 or channels is None or interlace:
        raise ValueError("only 8-bit gray/RGB non-interlaced PNGs are supported")
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels)
    if raw[:, 0].any():
        raise ValueError("only PNG filter type 0 is supported")
    out = raw[:, 1:].reshape(h, w, channels)
    return out[:, :, 0] if channels == 1 else out


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def problem_grid(
    problems: ImageProblems, n: int = 4, scale: int = 3, pad: int = 2
) -> UInt8[np.ndarray, "H W 3"]:
    """An RGB array: one row per problem (the first ``n``), its 4 images upscaled ``scale``
    times, each framed (the odd one in red)."""
    n = min(n, len(problems))
    if n < 1:
        raise ValueError("problem_grid needs at least one problem")
    if scale < 1 or pad < 1:
        raise ValueError(f"scale and pad must be >= 1, got {scale}, {pad}")
    side = problems.image_size * scale
    cell = side + 2 * pad
    grid = np.full((n * cell + pad, 4 * cell + pad, 3), 255, np.uint8)
    for b in range(n):
        for i in range(4):
            y, x = b * cell + pad, i * cell + pad
            colour = ODD_FRAME if i == int(problems.odd[b]) else FRAME
            grid[
                y - pad // 2 - 1 : y + side + pad // 2 + 1,
                x - pad // 2 - 1 : x + side + pad // 2 + 1,
            ] = colour
            grid[y : y + side, x : x + side] = _upscale(problems.images[b, i], scale)
    return grid


def problems_png(problems: ImageProblems, n: int = 4, scale: int = 3) -> bytes:
    """PNG bytes of :func:`problem_grid` (odd image framed in red)."""
    return encode_png(problem_grid(problems, n=n, scale=scale))


def problems_svg(problems: ImageProblems, n: int = 4, scale: int = 3) -> bytes:
    """SVG bytes: per problem a row of its 4 images (embedded PNGs) with their predicate values
    and object counts as captions; the odd image is framed in red."""
    n = min(n, len(problems))
    if n < 1:
        raise ValueError("problems_svg needs at least one problem")
    side = problems.image_size * scale
    gap, cap, head = 10, 30, 18
    width = 4 * (side + gap) + gap
    row_h = head + side + cap + gap
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{n * row_h + gap}" '
        f'font-family="sans-serif" font-size="10">'
    ]
    for b in range(n):
        y0 = gap + b * row_h
        title = f"{escape(problems.task)} {escape(problems.kind)}"
        if int(problems.context_n[b]):
            title += f", N = {int(problems.context_n[b])}"
        parts.append(f'<text x="{gap}" y="{y0 + 12}" font-weight="bold">{title}</text>')
        vals = problems.value_dicts(b)
        for i in range(4):
            x, y = gap + i * (side + gap), y0 + head
            odd = i == int(problems.odd[b])
            png = base64.b64encode(encode_png(_upscale(problems.images[b, i], scale))).decode()
            stroke = "rgb(220,30,30)" if odd else "rgb(200,200,200)"
            parts.append(
                f'<image x="{x}" y="{y}" width="{side}" height="{side}" '
                f'style="image-rendering:pixelated" href="data:image/png;base64,{png}"/>'
            )
            parts.append(
                f'<rect x="{x - 1}" y="{y - 1}" width="{side + 2}" height="{side + 2}" '
                f'fill="none" stroke="{stroke}" stroke-width="{3 if odd else 1}"/>'
            )
            caption = ", ".join(f"{k}={'T' if v else 'F'}" for k, v in vals[i].items())
            parts.append(f'<text x="{x}" y="{y + side + 12}">{escape(caption)}</text>')
            odd_txt = " (odd)" if odd else ""
            parts.append(
                f'<text x="{x}" y="{y + side + 24}">{int(problems.counts[b, i])} objects'
                f"{odd_txt}</text>"
            )
    parts.append("</svg>")
    return "\n".join(parts).encode()
