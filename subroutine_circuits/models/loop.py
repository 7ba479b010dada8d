"""The one training loop of base models.

Every way this library trains a model's own weights is a subclass of :class:`BaseTrainer`:
supervised odd-one-out and label training (``models.train``, Hugging Face fine-tuning),
masked-/next-token pretraining (``models.pretraining``), CNN odd-one-out training
(``models.cnn_train``), SimCLR (``models.simclr``) and the anti-selectivity fine-tuning of
entangled planted models (``groundtruth.entangled``). A subclass says what a batch is
(:meth:`BaseTrainer.batches`) and what its loss is (:meth:`BaseTrainer.loss`);
:meth:`BaseTrainer.run` owns the step: the optimiser step (:func:`optimizer_step`), the step
count, the time limit and the progress bar. :class:`EvaluatedTrainer` adds what the supervised
loops share: validation every ``eval_every`` steps, the training window, the history, the best
weights (restored at the end) and early stopping. :class:`LoopConfig` holds the settings every
base-model training config shares.

(Masks are trained by the other loop, ``experiment.converge.MaskTrainer``.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class LoopConfig:
    """Settings every base-model training loop shares (each config subclasses it and may
    change a default).

    Args:
        lr: the optimiser's learning rate (its peak, where a schedule applies).
        weight_decay: the optimiser's weight decay.
        batch_size: items (problems, sentences, images) per step.
        seed: seeds the order of training batches and any other draw of the loop.
        device: where to train (``"cpu"`` or ``"cuda"``); the model is moved there.
        time_limit_s: stop after this many seconds (``None``: no limit).
        progress: show a tqdm progress bar.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        warmup_steps: linear learning-rate warm-up over this many steps (0: none).
    """

    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    time_limit_s: float | None = None
    progress: bool = True
    grad_clip: float | None = 1.0
    warmup_steps: int = 20

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad shared field."""
        name = type(self).__name__
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"{name}.batch_size must be an int >= 1, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"{name}.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"{name}.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"{name}.time_limit_s must be > 0, got {self.time_limit_s!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"{name}.grad_clip must be > 0, got {self.grad_clip!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"{name}.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")


@dataclass
class EarlyStopConfig(LoopConfig):
    """:class:`LoopConfig` plus what loops that validate share (:class:`EvaluatedTrainer`).

    Args:
        max_epochs: passes over the training items at most.
        max_steps: optimiser steps at most.
        patience: stop after this many evaluations without a new best.
        eval_every: evaluate on the validation items every this many steps (and at the end).
        target_val_acc: stop as soon as the validation accuracy reaches this (None: never).
        eval_batch_size: items per forward pass when evaluating.
    """

    max_epochs: int = 100
    max_steps: int = 3000
    patience: int = 8
    eval_every: int = 25
    target_val_acc: float | None = 0.99
    eval_batch_size: int = 256

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        super().validate()
        for name in ("max_epochs", "max_steps", "patience", "eval_every", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be an int >= 1, got {v!r}")


@dataclass
class TrainResult:
    """What a validated training run did (:meth:`EvaluatedTrainer.fit`).

    ``history`` has one dict per evaluation: step, epoch, train_loss (mean since the previous
    evaluation), train_acc (same window), val_acc, val_loss (where the loop measures it),
    seconds.
    """

    best_val_acc: float
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    stop_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar (or a no-op stand-in when disabled or tqdm is missing)."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=False)
        except ImportError:  # pragma: no cover
            pass

    class _Null:
        def update(self, n: int = 1) -> None:
            pass

        def set_postfix(self, *a: Any, **k: Any) -> None:
            pass

        def close(self) -> None:
            pass

    return _Null()


def trainable_parameters(model: Any) -> list[Tensor]:
    """The parameters with ``requires_grad``; ``ValueError`` when there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    return params


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning rate's multiplier at (0-based) ``step`` of a linear warm-up over
    ``warmup_steps`` steps (1 from then on, and always when ``warmup_steps`` is 0)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def warmup_schedule(optim: torch.optim.Optimizer, warmup_steps: int) -> Any:
    """A linear warm-up of ``optim``'s learning rate over ``warmup_steps`` steps, then constant
    (``None`` when ``warmup_steps`` is 0: the rate is constant from the start)."""
    if not warmup_steps:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optim, lambda s: warmup_factor(s, warmup_steps))


def optimizer_step(
    loss: Tensor,
    optim: torch.optim.Optimizer,
    params: Any,
    grad_clip: float | None,
    sched: Any = None,
    *,
    step: int,
    advice: str,
) -> float:
    """The one optimiser step of every base-model training loop: refuse a non-finite loss
    (``advice``: what to lower or check), then zero the gradients, backpropagate, clip the
    gradient norm of ``params`` to ``grad_clip`` (None: no clipping), step the optimiser and
    the learning-rate schedule ``sched`` (if any). Returns the loss's value: reading it is the
    step's one host synchronisation."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(f"NaN/inf loss ({value}) at step {step}: lower {advice}")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optim.step()
    if sched is not None:
        sched.step()
    return value


class BaseTrainer:
    """The one loop that trains a base model's weights (see the module docstring).

    Subclasses implement :meth:`batches` and :meth:`loss`, and may hook :meth:`begin` (before
    the first step; may stop at once), :meth:`before_step` (e.g. set the learning rate) and
    :meth:`after_step` (record, evaluate; may stop). :meth:`run` returns the stop reason:
    the one a hook gave, ``"time_limit"``, or :attr:`default_reason` when the steps ran out.
    The model is in train mode during steps and left in eval mode.
    """

    #: the progress bar's label
    desc: str = "train"
    #: the stop reason when every step ran
    default_reason: str = "max_steps"

    def __init__(
        self,
        model: Any,
        optim: torch.optim.Optimizer,
        total_steps: int,
        *,
        params: Any = None,
        grad_clip: float | None = None,
        sched: Any = None,
        time_limit_s: float | None = None,
        progress: bool = False,
        advice: str = "the learning rate",
    ) -> None:
        self.model, self.optim, self.total_steps = model, optim, int(total_steps)
        self.params, self.grad_clip, self.sched = params, grad_clip, sched
        self.time_limit_s, self.progress, self.advice = time_limit_s, progress, advice
        self.step = 0
        self.start = time.perf_counter()

    # ------------------------------------------------------------------ what subclasses say
    def batches(self) -> Iterator[Any]:
        """The training batches, in order (drawn lazily: a batch is drawn just before its step)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[Tensor, Any]:
        """``(loss to minimise, anything after_step wants to know of the batch)``."""
        raise NotImplementedError

    def begin(self) -> str | None:
        """Runs before the first step; a stop reason ends the run before any step."""
        return None

    def before_step(self) -> None:
        """Runs before each step's forward pass (``self.step`` steps done so far)."""

    def after_step(
        self, batch: Any, loss: float, info: Any, bar: Any, last: bool, over_time: bool
    ) -> str | None:
        """Runs after each optimiser step (``self.step`` counts it; ``loss`` is the step's
        value); a stop reason ends the run."""
        return None

    # ------------------------------------------------------------------------------ the loop
    def elapsed(self) -> float:
        """Seconds since the run began."""
        return time.perf_counter() - self.start

    def run(self) -> str:
        """Train until the steps run out, a hook stops, or the time limit passes."""
        self.start = time.perf_counter()
        reason = self.begin()
        bar = progress_bar(self.total_steps, self.progress, self.desc)
        try:
            if reason is None and self.step < self.total_steps:
                for batch in self.batches():
                    self.model.train()
                    self.before_step()
                    loss, info = self.loss(batch)
                    value = optimizer_step(
                        loss, self.optim, self.params, self.grad_clip, self.sched,
                        step=self.step, advice=self.advice,
                    )  # fmt: skip
                    self.step += 1
                    bar.update(1)
                    last = self.step >= self.total_steps
                    over_time = self.time_limit_s is not None and self.elapsed() > self.time_limit_s
                    reason = self.after_step(batch, value, info, bar, last, over_time)
                    if reason is None and over_time:
                        reason = "time_limit"
                    if reason is not None or last:
                        break
        finally:
            bar.close()
            self.model.eval()
        return reason if reason is not None else self.default_reason


class EvaluatedTrainer(BaseTrainer):
    """A :class:`BaseTrainer` that validates: at step 0 and every ``cfg.eval_every`` steps (and
    at the last step, or when time runs out) it records one history row (step, epoch,
    train_loss and train_acc over the steps since the previous row, val_acc, val_loss where
    :meth:`validate` gives one, seconds), keeps the best weights (first reached; "best" is
    :meth:`better`), and stops at ``cfg.target_val_acc`` or after ``cfg.patience`` rows
    without a new best. At most ``cfg.max_steps`` steps and ``cfg.max_epochs`` epochs of
    ``n_train`` items. :meth:`fit` runs it and restores the best weights.

    Subclasses' :meth:`loss` return ``(loss, (correct answers, items))`` of the batch; the
    correct answers may be a tensor on the training device (summed there, read at validation:
    no host synchronisation per step).
    """

    def __init__(
        self,
        model: Any,
        optim: torch.optim.Optimizer,
        cfg: EarlyStopConfig,
        n_train: int,
        *,
        params: Any,
        advice: str,
    ) -> None:
        self.steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        total = min(cfg.max_steps, cfg.max_epochs * self.steps_per_epoch)
        super().__init__(model, optim, total, params=params, grad_clip=cfg.grad_clip,
                         sched=warmup_schedule(optim, cfg.warmup_steps),
                         time_limit_s=cfg.time_limit_s, progress=cfg.progress,
                         advice=advice)  # fmt: skip
        self.default_reason = "max_steps" if total == cfg.max_steps else "max_epochs"
        self.eval_every, self.patience = cfg.eval_every, cfg.patience
        self.target_val_acc = cfg.target_val_acc
        self.history: list[dict[str, float]] = []
        self.best_key: tuple[float, ...] | None = None
        self.best_acc, self.best_step, self.since_best = 0.0, 0, 0
        self.best_state: dict[str, Tensor] = {}
        self.win_loss, self.win_correct, self.win_n = 0.0, 0, 0

    def validate(self) -> tuple[float, float | None]:
        """``(validation accuracy, validation loss or None)`` of the model now (in eval mode)."""
        raise NotImplementedError

    def better(self, acc: float, loss: float | None) -> tuple[float, ...]:
        """The key that ranks evaluations (larger is better): accuracy by default."""
        return (acc,)

    def _evaluate(self) -> str | None:
        """One validation row; returns ``"target_val_acc"``, ``"patience"`` or None."""
        self.model.eval()
        acc, loss = self.validate()
        n = self.win_n
        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
               "train_loss": self.win_loss / n if n else math.nan,
               "train_acc": int(self.win_correct) / n if n else math.nan,
               "val_acc": acc}  # fmt: skip
        if loss is not None:
            row["val_loss"] = loss
        row["seconds"] = self.elapsed()
        self.history.append(row)
        self.win_loss, self.win_correct, self.win_n = 0.0, 0, 0
        key = self.better(acc, loss)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_acc, self.best_step, self.since_best = key, acc, self.step, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.since_best += 1
        if self.target_val_acc is not None and acc >= self.target_val_acc:
            return "target_val_acc"
        if self.since_best >= self.patience:
            return "patience"
        return None

    def begin(self) -> str | None:
        """Validate the initial weights (the first "best")."""
        return self._evaluate()

    def after_step(
        self, batch: Any, loss: float, info: Any, bar: Any, last: bool, over_time: bool
    ) -> str | None:
        """Add the batch to the training window; validate when due."""
        n_correct, n_items = info
        self.win_loss += loss * n_items
        self.win_correct = self.win_correct + n_correct
        self.win_n += int(n_items)
        if self.step % self.eval_every == 0 or last or over_time:
            reason = self._evaluate()
            row = self.history[-1]
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_acc']:.3f}")
            return reason
        return None

    def fit(self) -> TrainResult:
        """Run, restore the best weights (the model is left in eval mode), say what happened."""
        reason = self.run()
        self.model.load_state_dict(self.best_state)
        self.model.eval()
        return TrainResult(best_val_acc=self.best_acc, best_step=self.best_step,
                           history=self.history, seconds=self.elapsed(), steps=self.step,
                           stop_reason=reason)  # fmt: skip
