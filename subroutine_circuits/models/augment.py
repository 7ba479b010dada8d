"""The SimCLR view augmentations of shape-world images (``models.simclr``).

They are plain torch and preserve the predicates inside, contact and number:

- horizontal flip (p = 0.5), rotation by up to ``rotation_deg`` (default 90 degrees), and with
  p = 0.5 a random affine map (rotation 30 deg, translation 5%, scale 0.9-1, shear 20 deg), all
  composed into one ``F.affine_grid`` / ``F.grid_sample`` call with **nearest** sampling (the
  1-px outlines stay crisp) and **white fill**; when a transform would push any object pixel
  off the canvas, that image keeps only its flip (so no object is cut and no count changes);
- colour jitter (p = 0.5: contrast and saturation factors in [0.5, 1.5]) and grayscale
  (p = 0.2), applied to object pixels only: the background stays exactly white and every object
  pixel stays distinguishable from it.

Images are normalised as ``(x - 0.9) / 0.1`` (white = 1.0); the augmentations work on ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

_GRAY = (0.299, 0.587, 0.114)


@dataclass
class AugmentConfig:
    """SimCLR view augmentations (defaults: the paper's, see the module docstring).

    Attributes:
        norm_mean, norm_std: the images' normalisation ``(x - mean) / std``.
        background_tol: a pixel is background when every channel of ``x`` is >= ``1 - tol``.
        hflip_p: probability of a horizontal flip.
        rotation_deg: rotation angle drawn uniformly in ``[-rotation_deg, rotation_deg]``.
        affine_p: probability of the extra affine map.
        affine_deg, translate, scale, shear_deg: its rotation range, translation (fraction of
            the side), scale range and shear range (degrees).
        jitter_p: probability of the colour jitter.
        contrast, saturation: jitter factors drawn in ``[1 - c, 1 + c]``.
        grayscale_p: probability of turning the objects gray.
        keep_on_canvas: skip the geometric part for an image when it would move an object
            pixel off the canvas.
    """

    norm_mean: float = 0.9
    norm_std: float = 0.1
    background_tol: float = 0.02
    hflip_p: float = 0.5
    rotation_deg: float = 90.0
    affine_p: float = 0.5
    affine_deg: float = 30.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.9, 1.0)
    shear_deg: float = 20.0
    jitter_p: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    grayscale_p: float = 0.2
    keep_on_canvas: bool = True

    def __post_init__(self) -> None:
        self.scale = tuple(float(v) for v in self.scale)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("hflip_p", "affine_p", "jitter_p", "grayscale_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must lie in [0, 1], got {v!r}")
        if not self.norm_std > 0:
            raise ValueError(f"AugmentConfig.norm_std must be > 0, got {self.norm_std!r}")
        if not 0 < self.background_tol < 0.5:
            raise ValueError(
                f"AugmentConfig.background_tol must lie in (0, 0.5), got {self.background_tol!r}"
            )
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"AugmentConfig.scale must be (lo, hi) with 0 < lo <= hi, got "
                             f"{self.scale!r}")  # fmt: skip
        for name in ("rotation_deg", "affine_deg", "translate", "shear_deg", "contrast",
                     "saturation"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.contrast > 1 or self.saturation > 1:
            raise ValueError("AugmentConfig.contrast and saturation must be <= 1")


def foreground(x01: Float[Tensor, "n c h w"], tol: float = 0.02) -> Bool[Tensor, "n 1 h w"]:
    """Object pixels of un-normalised images: any channel darker than ``1 - tol``."""
    return (x01 < 1.0 - tol).any(dim=1, keepdim=True)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _rot(theta: Tensor) -> Tensor:
    """[n, 2, 2] rotation matrices (radians)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _forward_maps(
    n: int, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: the flip-only matrix and the full forward map ``p_out = A p_in + t``
    (normalised coordinates, float64 on the CPU)."""
    flip = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.hflip_p
    f = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    f[flip, 0, 0] = -1.0
    rot = _rot(torch.deg2rad(_uniform(n, -cfg.rotation_deg, cfg.rotation_deg, gen)))
    use_aff = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.affine_p
    ang = torch.deg2rad(_uniform(n, -cfg.affine_deg, cfg.affine_deg, gen))
    shear = torch.tan(torch.deg2rad(_uniform(n, -cfg.shear_deg, cfg.shear_deg, gen)))
    scale = _uniform(n, cfg.scale[0], cfg.scale[1], gen)
    tr = torch.stack([_uniform(n, -cfg.translate, cfg.translate, gen) for _ in range(2)], -1) * 2
    sh = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    sh[:, 0, 1] = shear
    aff = scale[:, None, None] * (_rot(ang) @ sh)
    eye = torch.eye(2, dtype=torch.float64).expand(n, 2, 2)
    aff = torch.where(use_aff[:, None, None], aff, eye)
    t = torch.where(use_aff[:, None], tr, torch.zeros_like(tr))
    a = rot @ aff @ f
    return f, a, t


def warp_white(
    x01: Float[Tensor, "n c h w"], a: Float[Tensor, "n 2 2"], t: Float[Tensor, "n 2"]
) -> Float[Tensor, "n c h w"]:
    """Move every image by its forward map ``p_out = a @ p_in + t`` (normalised coordinates in
    [-1, 1], x then y), with nearest sampling and white (1.0) fill. ``x01`` is un-normalised."""
    n, c, h, w = x01.shape
    a = torch.as_tensor(a, dtype=torch.float64).cpu()
    t = torch.as_tensor(t, dtype=torch.float64).cpu()
    a_inv = torch.linalg.inv(a)  # grid_sample maps output coords to input coords
    theta = torch.cat([a_inv, -(a_inv @ t[:, :, None])], dim=2).to(x01.device, torch.float32)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    # sample (x - 1) so that zero padding is white; nearest keeps 1-px outlines crisp
    out = F.grid_sample(x01 - 1.0, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out + 1.0


def augment_images(
    images: Float[Tensor, "n c h w"],
    cfg: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "n c h w"]:
    """One random view of every image (normalised in, normalised out; same device).

    Randomness comes from ``generator`` (a CPU generator; default: seeded with 0), so views are
    reproducible across devices. Square images only.
    """
    cfg = cfg if cfg is not None else AugmentConfig()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be [n, c, h, w], got {tuple(getattr(images, 'shape', ()))}")
    n, c, h, w = images.shape
    if h != w:
        raise ValueError(f"augment_images needs square images, got {h}x{w}")
    if n == 0:
        raise ValueError("empty batch: images has 0 items")
    device = images.device
    x01 = images.float() * cfg.norm_std + cfg.norm_mean

    # ---- geometry
    f, a, t = _forward_maps(n, cfg, gen)
    if cfg.keep_on_canvas:
        # forward-map every object pixel's centre; images where one leaves the canvas keep
        # only their flip (computed where the images are, in float32: a pixel is 2/w wide)
        fg = foreground(x01, cfg.background_tol)[:, 0].reshape(n, -1)  # [n, h*w]
        centres = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")
        pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)  # [h*w, 2] as (x, y)
        a32, t32 = a.to(device, torch.float32), t.to(device, torch.float32)
        out = torch.einsum("nij,pj->npi", a32, pts) + t32[:, None, :]  # [n, h*w, 2]
        reach = out.abs().amax(-1).masked_fill(~fg, 0.0).amax(-1)  # [n]
        ok = (reach <= float(centres[-1]) + 1e-4).cpu()
        a = torch.where(ok[:, None, None], a, f)
        t = torch.where(ok[:, None], t, torch.zeros_like(t))
    x01 = warp_white(x01, a, t)

    # ---- colour, on object pixels only
    fg = foreground(x01, cfg.background_tol)  # [n, 1, h, w]
    gray_w = torch.tensor(_GRAY, device=device).view(1, 3, 1, 1) if c == 3 else None
    if gray_w is not None:
        jit = (torch.rand(n, generator=gen) < cfg.jitter_p).to(device)
        sat = (1 + (torch.rand(n, generator=gen) * 2 - 1) * cfg.saturation).to(device)
        con = (1 + (torch.rand(n, generator=gen) * 2 - 1) * cfg.contrast).to(device)
        gray = (x01 * gray_w).sum(1, keepdim=True)
        y = gray + sat.view(n, 1, 1, 1) * (x01 - gray)
        gray = (y * gray_w).sum(1, keepdim=True)
        fgf = fg.float()
        m = (gray * fgf).sum((1, 2, 3)) / fgf.sum((1, 2, 3)).clamp_min(1.0)  # mean object gray
        y = m.view(n, 1, 1, 1) + con.view(n, 1, 1, 1) * (y - m.view(n, 1, 1, 1))
        x01 = torch.where(jit.view(n, 1, 1, 1) & fg, y, x01)
        to_gray = (torch.rand(n, generator=gen) < cfg.grayscale_p).to(device)
        gray = (x01 * gray_w).sum(1, keepdim=True).expand_as(x01)
        x01 = torch.where(to_gray.view(n, 1, 1, 1) & fg, gray, x01)
        # object pixels stay objects: never lighter than the background threshold
        x01 = torch.where(fg, x01.clamp(0.0, 1.0 - 2 * cfg.background_tol), x01)
    return ((x01 - cfg.norm_mean) / cfg.norm_std).to(images.dtype)
