"""SimCLR pretraining of a hooked CNN on single shape-world images (the paper's "pretrained" arm).

Two augmented views of every image (``models.augment``: plain torch, predicate-preserving)
go through the model; the model's own MLP head serves as the projection head (as in the
paper); the NT-Xent loss (temperature 0.07) pulls the two views of an image together and pushes
the other ``2n - 2`` images of the batch away. AdamW with a cosine decay of the learning rate
to ``lr / 50``. Afterwards the projection head is dropped: the head is re-initialised, so the
OOO head is trained from scratch on the composite task.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from subroutine_circuits.models.augment import AugmentConfig, augment_images
from subroutine_circuits.models.loop import (
    BaseTrainer,
    LoopConfig,
    trainable_parameters,
    warmup_factor,
)


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
class SimCLRConfig(LoopConfig):
    """SimCLR settings (defaults: the paper's, except ``epochs``; cap with ``max_steps``).

    The shared fields are :class:`~subroutine_circuits.models.loop.LoopConfig`'s: ``lr`` (AdamW's
    peak learning rate; cosine decay to ``lr * final_lr_ratio`` over the run, after a linear
    warm-up over ``warmup_steps``, default none), ``weight_decay``, ``batch_size`` (images per
    step, 2 views each: ``2 * batch_size`` forward items; at least 2), ``seed`` (the image order,
    the views and the head re-initialisation), ``device``, ``time_limit_s`` (the cosine schedule
    then follows the elapsed fraction of this budget when it is ahead of the step fraction),
    ``progress`` and ``grad_clip`` (default: no clipping).

    Attributes:
        epochs: passes over the images.
        max_steps: optimiser steps at most (None: ``epochs`` decides).
        final_lr_ratio: the last learning rate as a fraction of ``lr`` (the paper: 1/50).
        temperature: NT-Xent temperature.
        reset_head: re-initialise the head (drop the projection head) after pretraining.
        augment: the view augmentations.
    """

    lr: float = 5e-4
    batch_size: int = 128
    grad_clip: float | None = None
    warmup_steps: int = 0
    epochs: int = 100
    max_steps: int | None = None
    final_lr_ratio: float = 1.0 / 50.0
    temperature: float = 0.07
    reset_head: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        super().validate()
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"SimCLRConfig.epochs must be an int >= 1, got {self.epochs!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):  # fmt: skip
            raise ValueError(f"SimCLRConfig.max_steps must be None or >= 1, got {self.max_steps!r}")
        if self.batch_size < 2:
            raise ValueError(
                f"SimCLRConfig.batch_size must be an int >= 2, got {self.batch_size!r}"
            )
        if not 0 < self.final_lr_ratio <= 1:
            raise ValueError(
                f"SimCLRConfig.final_lr_ratio must lie in (0, 1], got {self.final_lr_ratio!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"SimCLRConfig.temperature must be > 0, got {self.temperature!r}")
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


@torch.no_grad()
def partner_accuracy(z: Float[Tensor, "two_n d"]) -> float:
    """How often a view's nearest neighbour (cosine) among the other ``2n - 1`` is its partner
    (views ``i`` and ``i + n``)."""
    bs = z.shape[0] // 2
    zn = F.normalize(z.detach(), dim=1)
    sim = (zn @ zn.T).fill_diagonal_(-2.0)
    partner = torch.cat([torch.arange(bs, 2 * bs), torch.arange(bs)]).to(z.device)
    return float((sim.argmax(1) == partner).float().mean())


class _SimCLRTrainer(BaseTrainer):
    """SimCLR on the one base-model loop: epochs of shuffled whole batches of images (the last
    partial batch is dropped: too few negatives), two augmented views of each, NT-Xent, AdamW
    at the cosine learning rate of the step; per-epoch means of the loss and of the partner
    accuracy are recorded."""

    desc = "simclr"

    def __init__(self, model: Any, images: Tensor, cfg: SimCLRConfig) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(
                f"images must be [n, c, h, w], got {tuple(getattr(images, 'shape', ()))}"
            )
        n = images.shape[0]
        if n < 2:
            raise ValueError(f"SimCLR needs at least 2 images, got {n}")
        self.bs = min(cfg.batch_size, n)
        self.steps_per_epoch = n // self.bs
        total = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        self.device = torch.device(cfg.device)
        model.to(self.device)
        if hasattr(getattr(model, "cfg", None), "device"):
            model.cfg.device = str(self.device)
        params = trainable_parameters(model)
        optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        super().__init__(model, optim, total, params=params, grad_clip=cfg.grad_clip,
                         time_limit_s=cfg.time_limit_s, progress=cfg.progress,
                         advice=f"SimCLRConfig.lr (now {cfg.lr})")  # fmt: skip
        capped = cfg.max_steps is not None and total == cfg.max_steps
        self.default_reason = "max_steps" if capped else "epochs"
        self.images, self.cfg = images, cfg
        self.gen = torch.Generator().manual_seed(int(cfg.seed))
        self.aug_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        self.history: list[dict[str, float]] = []
        self.epoch: list[tuple[float, float]] = []
        self.recent: list[tuple[float, float]] = []
        self.first_loss = float("nan")

    def batches(self) -> Iterator[Tensor]:
        """Batches of images on the training device."""
        n, bs = self.images.shape[0], self.bs
        while True:
            order = torch.randperm(n, generator=self.gen)
            for b in range(self.steps_per_epoch):
                yield self.images[order[b * bs : (b + 1) * bs]].to(self.device)

    def before_step(self) -> None:
        """Set the step's learning rate (warm-up, then cosine)."""
        cfg = self.cfg
        t_frac = 0.0 if cfg.time_limit_s is None else self.elapsed() / cfg.time_limit_s
        lr = cosine_lr(self.step, self.total_steps, cfg.lr, cfg.final_lr_ratio, t_frac)
        lr *= warmup_factor(self.step, cfg.warmup_steps)
        for g in self.optim.param_groups:
            g["lr"] = lr

    def loss(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """NT-Xent of two views of ``batch``, and the projections (for the partner accuracy)."""
        v1 = augment_images(batch, self.cfg.augment, self.aug_gen)
        v2 = augment_images(batch, self.cfg.augment, self.aug_gen)
        z = self.model(torch.cat([v1, v2]))
        return nt_xent(z[: batch.shape[0]], z[batch.shape[0] :], self.cfg.temperature), z

    def after_step(
        self, batch: Any, loss: float, info: Any, bar: Any, last: bool, over_time: bool
    ) -> str | None:
        """Record the step's loss and partner accuracy; close an epoch's history row."""
        rec = (loss, partner_accuracy(info))
        self.epoch.append(rec)
        self.recent = (self.recent + [rec])[-10:]
        bar.set_postfix(loss=f"{rec[0]:.3f}", pos=f"{rec[1]:.2f}")
        if self.step % self.steps_per_epoch == 0 or last or over_time:
            ep = self.epoch
            self.history.append(dict(epoch=len(self.history) + 1, steps=self.step,
                                     loss=sum(e[0] for e in ep) / len(ep),
                                     pos_acc=sum(e[1] for e in ep) / len(ep),
                                     seconds=self.elapsed()))  # fmt: skip
            if len(self.history) == 1:
                self.first_loss = ep[0][0]
            self.epoch = []
        return None


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
    trainer = _SimCLRTrainer(model, images, cfg)
    stop_reason = trainer.run()
    if cfg.reset_head:
        model.reset_head(cfg.seed)
    model.eval()
    recent = trainer.recent
    return dict(
        steps=trainer.step, epochs=trainer.step / trainer.steps_per_epoch,
        seconds=trainer.elapsed(), first_loss=trainer.first_loss,
        final_loss=sum(r[0] for r in recent) / len(recent),
        final_pos_acc=sum(r[1] for r in recent) / len(recent), history=trainer.history,
        head_reset=bool(cfg.reset_head), stop_reason=stop_reason, n_images=images.shape[0],
        batch_size=trainer.bs,
    )  # fmt: skip
