"""Train a :class:`~subroutine_circuits.models.cnn.HookedCNN` on image odd-one-out problems.

A split is ``(images, odd)`` (or any object with ``.images`` and ``.odd``): ``images`` is a
float ``[b, 4, 3, h, w]`` tensor of normalised images, ``odd`` the ``[b]`` index of the odd one.
Training uses 4-way cross-entropy over the model's ``ooo_scores``, Adam or AdamW, early stopping
on validation accuracy (ties broken by validation loss) or on validation loss, and restores the
best weights. By default the position of the odd image is re-drawn every time a problem is seen
(as in the paper's data loader).

:func:`make_toy_ooo` builds a tiny synthetic task (square outlines vs crosses) for tests and
benchmarks; the real stimuli come from the shape-world tasks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from subroutine_circuits.models.train import TrainResult, _progress, optimizer_step

# Images are normalised as (x - NORM_MEAN) / NORM_STD with x in [0, 1] (white background = 1.0).
NORM_MEAN = 0.9
NORM_STD = 0.1


@dataclass
class CNNTrainConfig:
    """Optimisation settings of :func:`train_cnn_ooo` (defaults: the paper's recipe, capped).

    Args:
        lr: learning rate (constant).
        optimizer: ``"adam"`` (the paper) or ``"adamw"``.
        weight_decay: weight decay (AdamW's decoupled decay, Adam's L2).
        batch_size: problems per step (each has 4 images).
        max_epochs: passes over the training problems at most.
        max_steps: optimiser steps at most.
        eval_every: evaluate on the validation problems every this many steps (and at the end).
        patience: stop after this many evaluations without a new best.
        early_stop: ``"acc"`` (best = highest validation accuracy, ties -> lower loss) or
            ``"loss"`` (best = lowest validation loss, the paper's criterion).
        target_val_acc: stop as soon as the validation accuracy reaches this (None: never).
        shuffle_odd: re-draw the order of each problem's 4 images at every step.
        grad_clip: clip the gradient norm (None: no clipping).
        seed: seeds batch order and odd-position draws.
        device: where to train; the model is moved there.
        time_limit_s: stop (keeping the best weights so far) after this many seconds.
        progress: show a tqdm bar.
        eval_batch_size: problems per forward pass when evaluating.
    """

    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 32
    max_epochs: int = 100
    max_steps: int = 3000
    eval_every: int = 50
    patience: int = 10
    early_stop: str = "acc"
    target_val_acc: float | None = 0.99
    shuffle_odd: bool = True
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    time_limit_s: float | None = None
    progress: bool = True
    eval_batch_size: int = 64

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in (
            "batch_size",
            "max_epochs",
            "max_steps",
            "eval_every",
            "patience",
            "eval_batch_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CNNTrainConfig.{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"CNNTrainConfig.lr must be > 0, got {self.lr!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(
                f"CNNTrainConfig.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"CNNTrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.early_stop not in ("acc", "loss"):
            raise ValueError(
                f"CNNTrainConfig.early_stop must be 'acc' or 'loss', got {self.early_stop!r}"
            )
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"CNNTrainConfig.time_limit_s must be > 0, got {self.time_limit_s!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"CNNTrainConfig.grad_clip must be > 0, got {self.grad_clip!r}")


def as_image_split(
    split: Any, name: str = "split"
) -> tuple[Float[Tensor, "b k c h w"], Int[Tensor, "b"]]:
    """``(images, odd)`` of a split: a pair, a shape-world ``ImageProblems`` (anything with
    ``to_tensor()`` and ``odd_tensor()``) or an object with float ``.images`` and ``.odd``.

    Raises ``ValueError`` for wrong shapes, an empty split or odd indices out of range.
    """
    if isinstance(split, (tuple, list)) and len(split) == 2:
        images, odd = split
    elif hasattr(split, "to_tensor") and hasattr(split, "odd_tensor"):
        # a shape-world ``ImageProblems`` (uint8 [b, 4, h, w, 3] -> normalised [b, 4, 3, h, w])
        images, odd = split.to_tensor(), split.odd_tensor()
    elif hasattr(split, "images") and hasattr(split, "odd"):
        images, odd = split.images, split.odd
    else:
        raise ValueError(
            f"{name} must be (images, odd) or have .images and .odd, got {type(split).__name__}"
        )
    images = torch.as_tensor(images)
    odd = torch.as_tensor(odd)
    if images.ndim != 5:
        raise ValueError(f"{name} images must be [b, 4, c, h, w], got {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"{name} images must be float (normalised), got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"empty {name}: no problems")
    if odd.ndim != 1 or odd.shape[0] != images.shape[0]:
        raise ValueError(f"{name} odd must be [b] with b={images.shape[0]}, got {tuple(odd.shape)}")
    if odd.dtype.is_floating_point:
        raise ValueError(f"{name} odd must hold integer indices, got {odd.dtype}")
    k = images.shape[1]
    if int(odd.min()) < 0 or int(odd.max()) >= k:
        raise ValueError(f"{name} odd indices must lie in [0, {k}), got [{int(odd.min())}, "
                         f"{int(odd.max())}]")  # fmt: skip
    return images, odd.long()


def shuffle_problems(
    images: Float[Tensor, "b k c h w"], odd: Int[Tensor, "b"], generator: torch.Generator
) -> tuple[Float[Tensor, "b k c h w"], Int[Tensor, "b"]]:
    """Permute each problem's images independently; return the images and the new odd index."""
    b, k = images.shape[:2]
    perm = torch.argsort(torch.rand(b, k, generator=generator), dim=1).to(images.device)
    shuffled = images[torch.arange(b, device=images.device)[:, None], perm]
    new_odd = (perm == odd.to(images.device)[:, None]).long().argmax(dim=1)
    return shuffled, new_odd


@torch.no_grad()
def cnn_ooo_logits(
    model: Any, images: Float[Tensor, "b k c h w"], batch_size: int = 64
) -> Float[Tensor, "b k"]:
    """OOO logits of many problems, batched, under ``no_grad`` (hooks on the model fire).

    Returned on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    out = [
        model.ooo_scores(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def cnn_ooo_eval(model: Any, split: Any, batch_size: int = 64) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on a split (chance accuracy 0.25)."""
    images, odd = as_image_split(split)
    logits = cnn_ooo_logits(model, images, batch_size)
    acc = float((logits.argmax(-1) == odd).float().mean())
    return acc, float(F.cross_entropy(logits, odd))


def cnn_ooo_accuracy(model: Any, split: Any, batch_size: int = 64) -> float:
    """Fraction of problems whose highest OOO score is at the odd index (chance 0.25)."""
    return cnn_ooo_eval(model, split, batch_size)[0]


@dataclass
class _Loop:
    """The mutable state of one :func:`train_cnn_ooo` run (best weights, window, stopping)."""

    start: float
    steps_per_epoch: int
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_acc: float = 0.0
    best_step: int = 0
    best_state: dict[str, Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0
    since_best: int = 0
    stop_reason: str = ""
    done: bool = False
    win_loss: float = 0.0
    win_correct: int = 0
    win_n: int = 0


def _optimizer(model: Any, cfg: CNNTrainConfig) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """The trainable parameters and Adam / AdamW over them."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return params, opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _val_key(cfg: CNNTrainConfig, acc: float, loss: float) -> tuple[float, float]:
    """What "better" means: higher accuracy (ties: lower loss), or lower loss (ties: accuracy)."""
    return (acc, -loss) if cfg.early_stop == "acc" else (-loss, acc)


def _train_step(
    model: Any,
    optim: torch.optim.Optimizer,
    params: list[Tensor],
    x: Float[Tensor, "b k c h w"],
    y: Int[Tensor, " b"],
    cfg: CNNTrainConfig,
    step: int,
) -> tuple[float, int]:
    """One optimiser step on a batch; returns its loss and number of correct answers."""
    model.train()
    logits = model.ooo_scores(x)
    loss_t = F.cross_entropy(logits, y)
    optimizer_step(loss_t, optim, params, cfg.grad_clip, step=step,
                   advice=f"CNNTrainConfig.lr (now {cfg.lr}) or check the images")  # fmt: skip
    return float(loss_t.detach()), int((logits.detach().argmax(-1) == y).sum())


def _record_eval(model: Any, loop: _Loop, acc: float, loss: float, cfg: CNNTrainConfig) -> None:
    """Log an evaluation, keep the best weights and decide whether to stop (target, patience)."""
    loop.history.append(dict(
        step=loop.step, epoch=loop.step / loop.steps_per_epoch,
        train_loss=loop.win_loss / loop.win_n if loop.win_n else float("nan"),
        train_acc=loop.win_correct / loop.win_n if loop.win_n else float("nan"),
        val_acc=acc, val_loss=loss, seconds=time.perf_counter() - loop.start,
    ))  # fmt: skip
    loop.win_loss, loop.win_correct, loop.win_n = 0.0, 0, 0
    k = _val_key(cfg, acc, loss)
    if k > loop.best_key:
        loop.best_key, loop.best_acc, loop.best_step, loop.since_best = k, acc, loop.step, 0
        loop.best_state = {n: v.detach().clone() for n, v in model.state_dict().items()}
    else:
        loop.since_best += 1
    if cfg.target_val_acc is not None and acc >= cfg.target_val_acc:
        loop.done, loop.stop_reason = True, "target_val_acc"
    elif loop.since_best >= cfg.patience:
        loop.done, loop.stop_reason = True, "patience"


def train_cnn_ooo(
    model: Any, train: Any, val: Any, cfg: CNNTrainConfig | None = None
) -> TrainResult:
    """Train every parameter of ``model`` on OOO problems; keep the best validation weights.

    Args:
        model: a ``HookedCNN`` (anything with ``ooo_scores([b, 4, c, h, w]) -> [b, 4]``).
        train, val: splits, ``(images [b, 4, 3, h, w], odd [b])``.
        cfg: optimisation settings.

    Returns:
        A ``TrainResult``; ``history`` rows have step, epoch, train_loss, train_acc (over the
        steps since the previous evaluation), val_acc, val_loss and seconds. The model is left
        in eval mode on ``cfg.device`` with the best weights.
    """
    cfg = cfg if cfg is not None else CNNTrainConfig()
    cfg.validate()
    tr_img, tr_odd = as_image_split(train, "train split")
    va = as_image_split(val, "validation split")
    device = torch.device(cfg.device)
    model.to(device)
    if hasattr(getattr(model, "cfg", None), "device"):
        model.cfg.device = str(device)
    params, optim = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    n_train = tr_img.shape[0]
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = min(cfg.max_steps, cfg.max_epochs * steps_per_epoch)
    loop = _Loop(start=time.perf_counter(), steps_per_epoch=steps_per_epoch)
    loop.stop_reason = "max_steps" if total_steps == cfg.max_steps else "max_epochs"

    def evaluate() -> None:
        model.eval()
        _record_eval(model, loop, *cnn_ooo_eval(model, va, cfg.eval_batch_size), cfg)

    evaluate()  # step 0: the initial weights are the first "best"
    bar = _progress(total_steps, cfg.progress, "train_cnn_ooo")
    try:
        while not loop.done and loop.step < total_steps:
            order = torch.randperm(n_train, generator=gen)
            for b0 in range(0, n_train, cfg.batch_size):
                idx = order[b0 : b0 + cfg.batch_size]
                x, y = tr_img[idx].to(device), tr_odd[idx].to(device)
                if cfg.shuffle_odd:
                    x, y = shuffle_problems(x, y, gen)
                loss, correct = _train_step(model, optim, params, x, y, cfg, loop.step)
                loop.step += 1
                bar.update(1)
                loop.win_loss += loss * len(idx)
                loop.win_correct += correct
                loop.win_n += len(idx)
                last = loop.step >= total_steps
                over_time = (cfg.time_limit_s is not None
                             and time.perf_counter() - loop.start > cfg.time_limit_s)  # fmt: skip
                if loop.step % cfg.eval_every == 0 or last or over_time:
                    evaluate()
                    h = loop.history[-1]
                    bar.set_postfix(loss=f"{h['train_loss']:.3f}", val=f"{h['val_acc']:.3f}")
                    if over_time and not loop.done:
                        loop.done, loop.stop_reason = True, "time_limit"
                if loop.done or last:
                    break
    finally:
        bar.close()
    model.load_state_dict(loop.best_state)
    model.eval()
    return TrainResult(best_val_acc=loop.best_acc, best_step=loop.best_step,
                       history=loop.history, seconds=time.perf_counter() - loop.start,
                       steps=loop.step, stop_reason=loop.stop_reason)  # fmt: skip


# ---------------------------------------------------------------------- a toy task
def _draw_toy(canvas: np.ndarray, kind: str, cy: int, cx: int, r: int, colour: np.ndarray) -> None:
    """Draw a 1-px square outline (``"square"``) or a plus sign (``"cross"``) of half-size r."""
    if kind == "square":
        canvas[:, cy - r, cx - r : cx + r + 1] = colour[:, None]
        canvas[:, cy + r, cx - r : cx + r + 1] = colour[:, None]
        canvas[:, cy - r : cy + r + 1, cx - r] = colour[:, None]
        canvas[:, cy - r : cy + r + 1, cx + r] = colour[:, None]
    else:
        canvas[:, cy, cx - r : cx + r + 1] = colour[:, None]
        canvas[:, cy - r : cy + r + 1, cx] = colour[:, None]


def make_toy_ooo(
    n_problems: int, image_size: int = 16, seed: int = 0
) -> tuple[Float[Tensor, "b 4 3 h w"], Int[Tensor, "b"]]:
    """A synthetic OOO task: three images show a square outline, the odd one a plus sign
    (or the reverse, per problem), each at a random place, size and colour on white.

    Images are normalised like the shape world (mean 0.9, std 0.1; white = 1.0). For tests and
    benchmarks only.
    """
    if n_problems < 1:
        raise ValueError(f"n_problems must be >= 1, got {n_problems}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    rng = np.random.default_rng(seed)
    imgs = np.ones((n_problems, 4, 3, image_size, image_size), dtype=np.float32)
    odd = rng.integers(0, 4, size=n_problems)
    r_max = max(2, image_size // 4)
    for p in range(n_problems):
        rule, other = ("square", "cross") if rng.random() < 0.5 else ("cross", "square")
        for i in range(4):
            r = int(rng.integers(2, r_max + 1))
            cy, cx = (int(v) for v in rng.integers(r, image_size - r, size=2))
            colour = rng.uniform(0.0, 0.8, size=3).astype(np.float32)
            _draw_toy(imgs[p, i], other if i == odd[p] else rule, cy, cx, r, colour)
    images = (torch.from_numpy(imgs) - NORM_MEAN) / NORM_STD
    return images, torch.from_numpy(odd).long()
