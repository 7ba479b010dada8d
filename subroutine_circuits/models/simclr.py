"""SimCLR pretraining of a hooked CNN on single shape-world images (the paper's "pretrained" arm).

Two augmented views of every image go through the model; the model's own MLP head serves as
the projection head (as in the paper); the NT-Xent loss (temperature 0.07) pulls the two views
of an image together and pushes the other ``2n - 2`` images of the batch away. AdamW with a
cosine decay of the learning rate to ``lr / 50``. Afterwards the projection head is dropped:
the head is re-initialised, so the OOO head is trained from scratch on the composite task.

The augmentations are plain torch and preserve the predicates inside, contact and number:

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

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from subroutine_circuits.models.train import _progress, optimizer_step

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


def nt_xent(
    z1: Float[Tensor, "n d"], z2: Float[Tensor, "n d"], temperature: float = 0.07
) -> Float[Tensor, ""]:
    """NT-Xent (normalised temperature-scaled cross-entropy) of two views.

    For each of the ``2n`` projections, the loss is the cross-entropy of picking its partner view
    among the other ``2n - 1`` projections, with cosine similarity / ``temperature`` as logits;
    the mean over all ``2n`` is returned.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be [n, d] of the same shape, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")  # fmt: skip
    if z1.shape[0] < 2:
        raise ValueError("NT-Xent needs at least 2 items per batch (negatives)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


@dataclass
class SimCLRConfig:
    """SimCLR settings (defaults: the paper's, except ``epochs``; cap with ``max_steps``).

    Attributes:
        epochs: passes over the images.
        max_steps: optimiser steps at most (None: ``epochs`` decides).
        batch_size: images per step (2 views each: ``2 * batch_size`` forward items).
        lr: AdamW peak learning rate; cosine decay to ``lr * final_lr_ratio`` over the run.
        final_lr_ratio: the last learning rate as a fraction of ``lr`` (the paper: 1/50).
        weight_decay: AdamW weight decay.
        temperature: NT-Xent temperature.
        reset_head: re-initialise the head (drop the projection head) after pretraining.
        seed: seeds the image order, the views and the head re-initialisation.
        device: where to train; the model is moved there.
        time_limit_s: stop after this many seconds (the cosine schedule then follows the
            elapsed fraction of this budget when it is ahead of the step fraction).
        progress: show a tqdm bar.
        augment: the view augmentations.
    """

    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 5e-4
    final_lr_ratio: float = 1.0 / 50.0
    weight_decay: float = 0.01
    temperature: float = 0.07
    reset_head: bool = True
    seed: int = 0
    device: str = "cpu"
    time_limit_s: float | None = None
    progress: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"SimCLRConfig.epochs must be an int >= 1, got {self.epochs!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):  # fmt: skip
            raise ValueError(f"SimCLRConfig.max_steps must be None or >= 1, got {self.max_steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(
                f"SimCLRConfig.batch_size must be an int >= 2, got {self.batch_size!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"SimCLRConfig.lr must be > 0, got {self.lr!r}")
        if not 0 < self.final_lr_ratio <= 1:
            raise ValueError(
                f"SimCLRConfig.final_lr_ratio must lie in (0, 1], got {self.final_lr_ratio!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"SimCLRConfig.temperature must be > 0, got {self.temperature!r}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"SimCLRConfig.time_limit_s must be > 0, got {self.time_limit_s!r}")
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        self.augment.validate()


def cosine_lr(
    step: int, total: int, lr: float, final_ratio: float, time_frac: float = 0.0
) -> float:
    """Cosine decay from ``lr`` at step 0 to ``lr * final_ratio`` at step ``total``.

    ``time_frac`` (elapsed / time limit) advances the schedule when the time budget runs out
    before the steps do, so a time-limited run still ends at the low learning rate.
    """
    lo = lr * final_ratio
    frac = min(1.0, max(step / max(1, total), time_frac))
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _simclr_setup(
    model: Any, images: Tensor, cfg: SimCLRConfig
) -> tuple[int, int, int, torch.device, torch.optim.Optimizer]:
    """Check the inputs, move the model; returns ``(batch size, steps per epoch, total steps,
    device, AdamW optimiser)``."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be [n, c, h, w], got {tuple(getattr(images, 'shape', ()))}")
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"SimCLR needs at least 2 images, got {n}")
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # drop the last partial batch (too few negatives)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    device = torch.device(cfg.device)
    model.to(device)
    if hasattr(getattr(model, "cfg", None), "device"):
        model.cfg.device = str(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return bs, steps_per_epoch, total, device, optim


@torch.no_grad()
def partner_accuracy(z: Float[Tensor, "two_n d"]) -> float:
    """How often a view's nearest neighbour (cosine) among the other ``2n - 1`` is its partner
    (views ``i`` and ``i + n``)."""
    bs = z.shape[0] // 2
    zn = F.normalize(z.detach(), dim=1)
    sim = (zn @ zn.T).fill_diagonal_(-2.0)
    partner = torch.cat([torch.arange(bs, 2 * bs), torch.arange(bs)]).to(z.device)
    return float((sim.argmax(1) == partner).float().mean())


def _simclr_step(
    model: Any, optim: torch.optim.Optimizer, x: Tensor, cfg: SimCLRConfig,
    aug_gen: torch.Generator, lr: float, step: int,
) -> tuple[float, float]:  # fmt: skip
    """Two views of ``x``, NT-Xent, one AdamW step at ``lr``; returns (loss, partner accuracy)."""
    bs = x.shape[0]
    v1 = augment_images(x, cfg.augment, aug_gen)
    v2 = augment_images(x, cfg.augment, aug_gen)
    z = model(torch.cat([v1, v2]))
    loss = nt_xent(z[:bs], z[bs:], cfg.temperature)
    for g in optim.param_groups:
        g["lr"] = lr
    optimizer_step(loss, optim, None, None, step=step,
                   advice=f"SimCLRConfig.lr (now {cfg.lr})")  # fmt: skip
    return float(loss.detach()), partner_accuracy(z)


def simclr_pretrain(
    model: Any, images: Float[Tensor, "n c h w"], cfg: SimCLRConfig | None = None
) -> dict[str, Any]:
    """Pretrain ``model`` (all weights) with SimCLR on single images; then drop the projection
    head by re-initialising ``model.head`` (``cfg.reset_head``).

    Args:
        model: a ``HookedCNN`` (``model(images) -> [n, d]``; ``reset_head(seed)`` when
            ``cfg.reset_head``).
        images: ``[n, c, h, w]`` normalised images (e.g. images 3 and 4 of every training
            problem; training split only). Kept where they are; batches move to ``cfg.device``.
        cfg: settings.

    Returns:
        ``info``: ``steps``, ``epochs`` (float), ``seconds``, ``first_loss``, ``final_loss``
        (mean of the last epoch's, or last 10 steps'), ``final_pos_acc`` (how often a view's
        nearest neighbour is its partner), ``history`` (per-epoch means), ``head_reset`` and
        ``stop_reason``. The model is left in eval mode.
    """
    cfg = cfg if cfg is not None else SimCLRConfig()
    cfg.validate()
    bs, steps_per_epoch, total, device, optim = _simclr_setup(model, images, cfg)
    n = images.shape[0]
    gen = torch.Generator().manual_seed(int(cfg.seed))
    aug_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    recent: list[tuple[float, float]] = []
    first_loss, step = float("nan"), 0
    stop_reason = "max_steps" if cfg.max_steps is not None and total == cfg.max_steps else "epochs"
    bar = _progress(total, cfg.progress, "simclr")
    model.train()
    try:
        while step < total and stop_reason != "time_limit":
            order = torch.randperm(n, generator=gen)
            ep = []
            for b in range(steps_per_epoch):
                x = images[order[b * bs : (b + 1) * bs]].to(device)
                t_frac = 0.0 if cfg.time_limit_s is None else (
                    (time.perf_counter() - start) / cfg.time_limit_s)  # fmt: skip
                lr = cosine_lr(step, total, cfg.lr, cfg.final_lr_ratio, t_frac)
                ep.append(_simclr_step(model, optim, x, cfg, aug_gen, lr, step))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{ep[-1][0]:.3f}", pos=f"{ep[-1][1]:.2f}")
                recent = (recent + ep[-1:])[-10:]
                over_time = (cfg.time_limit_s is not None
                             and time.perf_counter() - start > cfg.time_limit_s)  # fmt: skip
                if step >= total or over_time:
                    stop_reason = "time_limit" if over_time else stop_reason
                    break
            history.append(dict(epoch=len(history) + 1, steps=step,
                                loss=sum(e[0] for e in ep) / len(ep),
                                pos_acc=sum(e[1] for e in ep) / len(ep),
                                seconds=time.perf_counter() - start))  # fmt: skip
            if len(history) == 1:
                first_loss = ep[0][0]
    finally:
        bar.close()
    if cfg.reset_head:
        model.reset_head(cfg.seed)
    model.eval()
    return dict(
        steps=step, epochs=step / steps_per_epoch, seconds=time.perf_counter() - start,
        first_loss=first_loss, final_loss=sum(r[0] for r in recent) / len(recent),
        final_pos_acc=sum(r[1] for r in recent) / len(recent), history=history,
        head_reset=bool(cfg.reset_head), stop_reason=stop_reason, n_images=n, batch_size=bs,
    )  # fmt: skip
