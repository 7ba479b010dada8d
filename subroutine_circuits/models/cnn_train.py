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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from subroutine_circuits.models.loop import (
    EarlyStopConfig,
    EvaluatedTrainer,
    TrainResult,
    trainable_parameters,
)

# Images are normalised as (x - NORM_MEAN) / NORM_STD with x in [0, 1] (white background = 1.0).
NORM_MEAN = 0.9
NORM_STD = 0.1


@dataclass
class CNNTrainConfig(EarlyStopConfig):
    """Optimisation settings of :func:`train_cnn_ooo` (defaults: the paper's recipe, capped).

    The shared fields are :class:`~subroutine_circuits.models.loop.EarlyStopConfig`'s:
    ``lr`` (constant after ``warmup_steps``, default none), ``weight_decay`` (AdamW's
    decoupled decay, Adam's L2), ``batch_size`` (problems per step, 4 images each), ``seed``
    (batch order and odd-position draws), ``time_limit_s`` (stop keeping the best weights so
    far), ``max_epochs``, ``max_steps``, ``eval_every``, ``patience``, ``target_val_acc``,
    ``eval_batch_size`` and the rest.

    Args:
        optimizer: ``"adam"`` (the paper) or ``"adamw"``.
        early_stop: ``"acc"`` (best = highest validation accuracy, ties -> lower loss) or
            ``"loss"`` (best = lowest validation loss, the paper's criterion).
        shuffle_odd: re-draw the order of each problem's 4 images at every step.
    """

    # the paper's recipe: Adam at a constant 1e-3, no weight decay
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # images cost more than sentences: validate less often, in smaller batches
    eval_every: int = 50
    patience: int = 10
    eval_batch_size: int = 64
    optimizer: str = "adam"
    early_stop: str = "acc"
    shuffle_odd: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        super().validate()
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(
                f"CNNTrainConfig.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}"
            )
        if self.early_stop not in ("acc", "loss"):
            raise ValueError(
                f"CNNTrainConfig.early_stop must be 'acc' or 'loss', got {self.early_stop!r}"
            )


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


class _CNNTrainer(EvaluatedTrainer):
    """CNN odd-one-out training on the one base-model loop: Adam or AdamW over every
    trainable parameter, epochs of shuffled problems (``cfg.shuffle_odd``: each problem's
    images re-ordered at every step), 4-way cross-entropy, validation accuracy and loss."""

    desc = "train_cnn_ooo"

    def __init__(self, model: Any, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
                 cfg: CNNTrainConfig) -> None:  # fmt: skip
        params = trainable_parameters(model)
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        optim = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        advice = f"CNNTrainConfig.lr (now {cfg.lr}) or check the images"
        super().__init__(model, optim, cfg, train[0].shape[0], params=params, advice=advice)
        self.train, self.val, self.cfg = train, val, cfg

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images, odd)`` batches on the training device."""
        images, odd = self.train
        device, bs = torch.device(self.cfg.device), self.cfg.batch_size
        gen = torch.Generator().manual_seed(int(self.cfg.seed))
        while True:
            order = torch.randperm(images.shape[0], generator=gen)
            for b0 in range(0, images.shape[0], bs):
                idx = order[b0 : b0 + bs]
                x, y = images[idx].to(device), odd[idx].to(device)
                if self.cfg.shuffle_odd:
                    x, y = shuffle_problems(x, y, gen)
                yield x, y

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, int]]:
        """Cross-entropy of the OOO scores, the correct answers (on the device) and the batch
        size."""
        x, y = batch
        logits = self.model.ooo_scores(x)
        loss = F.cross_entropy(logits, y)
        return loss, ((logits.detach().argmax(-1) == y).sum(), len(y))

    def validate(self) -> tuple[float, float | None]:
        """Validation accuracy and mean cross-entropy."""
        return cnn_ooo_eval(self.model, self.val, self.cfg.eval_batch_size)

    def better(self, acc: float, loss: float | None) -> tuple[float, ...]:
        """Higher accuracy (ties: lower loss), or lower loss (ties: accuracy)."""
        return (acc, -loss) if self.cfg.early_stop == "acc" else (-loss, acc)


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
    train = as_image_split(train, "train split")
    val = as_image_split(val, "validation split")
    device = torch.device(cfg.device)
    model.to(device)
    if hasattr(getattr(model, "cfg", None), "device"):
        model.cfg.device = str(device)
    return _CNNTrainer(model, train, val, cfg).fit()


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
