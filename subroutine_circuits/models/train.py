"""Train a model on odd-one-out (OOO) problems with early stopping on validation accuracy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from subroutine_circuits.models.readout import (
    encode_problems,
    label_logit_diff,
    label_logits,
    ooo_logits,
    resolve_pool,
)


@dataclass
class TrainConfig:
    """Optimisation settings for ``train_ooo`` (defaults train a tiny model in seconds on CPU).

    Args:
        lr: AdamW learning rate (linear warm-up over ``warmup_steps``, then constant).
        weight_decay: AdamW weight decay.
        batch_size: OOO problems per step (each has 4 sequences).
        max_epochs: passes over the training problems at most.
        max_steps: optimiser steps at most.
        patience: stop after this many evaluations without a new best validation accuracy.
        eval_every: evaluate on the validation problems every this many steps (and at the end).
        seed: seeds the order of training batches.
        device: where to train (``"cpu"`` or ``"cuda"``); the model is moved there.
        time_limit_s: stop (keeping the best weights so far) after this many seconds.
        progress: show a tqdm progress bar.
        pool: sequence readout (``None``: the model's own ``sc_pool``, else ``"last"``).
        target_val_acc: stop as soon as the validation accuracy reaches this value.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        warmup_steps: linear learning-rate warm-up.
        eval_batch_size: problems per forward pass when evaluating.
    """

    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    max_epochs: int = 100
    max_steps: int = 3000
    patience: int = 8
    eval_every: int = 25
    seed: int = 0
    device: str = "cpu"
    time_limit_s: float | None = None
    progress: bool = True
    pool: str | None = None
    target_val_acc: float = 0.99
    grad_clip: float | None = 1.0
    warmup_steps: int = 20
    eval_batch_size: int = 256

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("batch_size", "max_epochs", "max_steps", "patience", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"TrainConfig.time_limit_s must be > 0, got {self.time_limit_s!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")


@dataclass
class TrainResult:
    """What ``train_ooo`` did.

    ``history`` has one dict per evaluation: step, epoch, train_loss (mean since the previous
    evaluation), train_acc (same window), val_acc, seconds.
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


def _progress(total: int, enabled: bool, desc: str):
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


@torch.no_grad()
def _encoded_accuracy(
    model: Any,
    tokens: Int[Tensor, "b 4 pos"],
    lengths: Int[Tensor, "b 4"],
    odd: Int[Tensor, "b"],
    pool: str,
    batch_size: int,
) -> float:
    """OOO accuracy of already-encoded problems."""
    correct = 0
    for i in range(0, tokens.shape[0], batch_size):
        logits = ooo_logits(model, tokens[i : i + batch_size], lengths[i : i + batch_size], pool)
        correct += int((logits.argmax(-1) == odd[i : i + batch_size]).sum())
    return correct / tokens.shape[0]


def _check_split(problems: Sequence[Any], name: str) -> list[Any]:
    problems = list(problems) if problems is not None else []
    if not problems:
        raise ValueError(f"empty {name} split: no problems to {name.split()[0]} on")
    return problems


class _Progress:
    """Early-stopping bookkeeping of :func:`_fit`: the training-loss window, the validation
    history, the best weights and the stop decision."""

    def __init__(self, model: Any, cfg: TrainConfig, steps_per_epoch: int, first_acc: float):
        self.model, self.cfg, self.steps_per_epoch = model, cfg, steps_per_epoch
        self.start = time.perf_counter()
        self.best_acc, self.best_step, self.evals_since_best = first_acc, 0, 0
        self.best_state = self._state()
        self.history: list[dict[str, float]] = [
            {"step": 0, "epoch": 0, "train_loss": float("nan"), "train_acc": float("nan"),
             "val_acc": first_acc, "seconds": self.elapsed()}
        ]  # fmt: skip
        self.win_loss, self.win_correct, self.win_n = 0.0, 0, 0

    def _state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def elapsed(self) -> float:
        """Seconds since training started."""
        return time.perf_counter() - self.start

    def over_time(self) -> bool:
        """Whether ``cfg.time_limit_s`` has passed."""
        return self.cfg.time_limit_s is not None and self.elapsed() > self.cfg.time_limit_s

    def add_batch(self, loss: Tensor, n_correct: int, n: int) -> None:
        """Accumulate one batch into the training window."""
        self.win_loss += float(loss.detach()) * n
        self.win_correct += n_correct
        self.win_n += n

    def evaluated(self, step: int, acc: float, bar: Any, over_time: bool) -> str | None:
        """Record a validation accuracy; returns the stop reason, or None to go on."""
        self.history.append(
            {
                "step": step,
                "epoch": step / self.steps_per_epoch,
                "train_loss": self.win_loss / self.win_n,
                "train_acc": self.win_correct / self.win_n,
                "val_acc": acc,
                "seconds": self.elapsed(),
            }
        )
        bar.set_postfix(loss=f"{self.win_loss / self.win_n:.3f}", val=f"{acc:.3f}")
        self.win_loss, self.win_correct, self.win_n = 0.0, 0, 0
        if acc > self.best_acc:
            self.best_acc, self.best_step, self.evals_since_best = acc, step, 0
            self.best_state = self._state()
        else:
            self.evals_since_best += 1
        if self.best_acc >= self.cfg.target_val_acc:
            return "target_val_acc"
        if self.evals_since_best >= self.cfg.patience:
            return "patience"
        if over_time:
            return "time_limit"
        return None


def _optimiser(model: Any, cfg: TrainConfig):
    """``(params, AdamW, warm-up scheduler)`` over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    return params, optim, sched


def _step(model, batch_step, idx, params, optim, sched, cfg: TrainConfig, step: int):
    """One optimiser step on the batch ``idx``; returns ``(loss, n_correct)``."""
    model.train()
    loss, n_correct = batch_step(idx)
    optimizer_step(loss, optim, params, cfg.grad_clip, sched, step=step,
                   advice=f"TrainConfig.lr (now {cfg.lr}) or check the model")  # fmt: skip
    return loss, n_correct


def optimizer_step(
    loss: Tensor,
    optim: torch.optim.Optimizer,
    params: Any,
    grad_clip: float | None,
    sched: Any = None,
    *,
    step: int,
    advice: str,
) -> None:
    """The one optimiser step of every base-model training loop (supervised, pretraining,
    CNN, SimCLR): refuse a non-finite loss (``advice``: what to lower or check), then zero the
    gradients, backpropagate, clip the gradient norm to ``grad_clip`` (None: no clipping),
    step the optimiser and the learning-rate schedule ``sched`` (if any)."""
    if not torch.isfinite(loss):
        raise ValueError(f"NaN/inf loss ({float(loss.detach())}) at step {step}: lower {advice}")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optim.step()
    if sched is not None:
        sched.step()


def _fit(
    model: Any,
    n_train: int,
    batch_step: Callable[[Tensor], tuple[Tensor, int]],
    val_accuracy: Callable[[], float],
    cfg: TrainConfig,
    desc: str,
) -> TrainResult:
    """Generic loop: AdamW over ``batch_step(indices) -> (loss, n_correct)``, evaluation with
    ``val_accuracy()`` every ``cfg.eval_every`` steps, early stopping, best-weight restore."""
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    params, optim, sched = _optimiser(model, cfg)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = min(cfg.max_steps, cfg.max_epochs * steps_per_epoch)
    model.eval()
    track = _Progress(model, cfg, steps_per_epoch, val_accuracy())
    step = 0
    stop_reason = "max_steps" if total_steps == cfg.max_steps else "max_epochs"
    bar = _progress(total_steps, cfg.progress, desc)
    done = track.best_acc >= cfg.target_val_acc
    if done:
        stop_reason = "target_val_acc"
    try:
        while not done and step < total_steps:
            order = torch.randperm(n_train, generator=gen).to(device)
            for b in range(0, n_train, cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                loss, n_correct = _step(model, batch_step, idx, params, optim, sched, cfg, step)
                step += 1
                bar.update(1)
                track.add_batch(loss, n_correct, len(idx))
                last = step >= total_steps
                over_time = track.over_time()
                if step % cfg.eval_every == 0 or last or over_time:
                    model.eval()
                    reason = track.evaluated(step, val_accuracy(), bar, over_time)
                    if reason is not None:
                        done, stop_reason = True, reason
                if done or last:
                    break
    finally:
        bar.close()
    model.load_state_dict(track.best_state)
    model.eval()
    return TrainResult(
        best_val_acc=track.best_acc,
        best_step=track.best_step,
        history=track.history,
        seconds=track.elapsed(),
        steps=step,
        stop_reason=stop_reason,
    )


def _prepare(model: Any, cfg: TrainConfig | None) -> TrainConfig:
    """Validate the config and move the model to its device."""
    cfg = cfg if cfg is not None else TrainConfig()
    cfg.validate()
    if str(model.cfg.device) != str(torch.device(cfg.device)):
        model.to(cfg.device, print_details=False)
    return cfg


def train_ooo(
    model: Any,
    train_problems: Sequence[Any],
    val_problems: Sequence[Any],
    tokenizer: Any,
    cfg: TrainConfig | None = None,
) -> TrainResult:
    """Train all of ``model``'s parameters on OOO problems (4-way cross-entropy over
    ``ooo_scores``), with AdamW and early stopping on validation accuracy.

    The weights with the best validation accuracy (first reached) are restored into ``model``
    at the end, which is left in eval mode on ``cfg.device``. Raises ``ValueError`` for an
    empty split or a non-finite loss.
    """
    cfg = _prepare(model, cfg)
    train_problems = _check_split(train_problems, "train split")
    val_problems = _check_split(val_problems, "validation split")
    pool = resolve_pool(model, cfg.pool)
    device = torch.device(cfg.device)
    tr_tok, tr_len, tr_odd = (t.to(device) for t in encode_problems(train_problems, tokenizer))
    va_tok, va_len, va_odd = (t.to(device) for t in encode_problems(val_problems, tokenizer))

    def batch_step(idx: Tensor) -> tuple[Tensor, int]:
        logits = ooo_logits(model, tr_tok[idx], tr_len[idx], pool)
        loss = F.cross_entropy(logits, tr_odd[idx])
        return loss, int((logits.detach().argmax(-1) == tr_odd[idx]).sum())

    def val_accuracy() -> float:
        return _encoded_accuracy(model, va_tok, va_len, va_odd, pool, cfg.eval_batch_size)

    return _fit(model, tr_tok.shape[0], batch_step, val_accuracy, cfg, "train_ooo")


def _encode_labels(
    examples: Sequence[Any], tokenizer: Any, device: torch.device
) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n"], Int[Tensor, "n"]]:
    """(tokens, lengths, labels 0/1) of ``LabelExample``-like objects (``text``, ``label``)."""
    tokens, lengths = tokenizer.encode_batch([e.text for e in examples])
    labels = torch.tensor([int(bool(e.label)) for e in examples], dtype=torch.long)
    return (
        torch.as_tensor(tokens).long().to(device),
        torch.as_tensor(lengths).to(device),
        (labels.to(device)),
    )


@torch.no_grad()
def label_accuracy(
    model: Any, examples: Sequence[Any], tokenizer: Any, batch_size: int = 512
) -> float:
    """Fraction of label examples where ``logit[yes] > logit[no]`` matches ``example.label``."""
    examples = _check_split(examples, "label examples")
    tokens, lengths, labels = _encode_labels(examples, tokenizer, torch.device(model.cfg.device))
    correct = 0
    for i in range(0, tokens.shape[0], batch_size):
        ln = lengths[i : i + batch_size]
        logits = label_logits(model, tokens[i : i + batch_size, : int(ln.max())], ln)
        diff = label_logit_diff(logits, tokenizer.yes_id, tokenizer.no_id)
        correct += int(((diff > 0).long() == labels[i : i + batch_size]).sum())
    return correct / tokens.shape[0]


def train_label(
    model: Any,
    train_examples: Sequence[Any],
    val_examples: Sequence[Any],
    tokenizer: Any,
    cfg: TrainConfig | None = None,
) -> TrainResult:
    """Train the label-token readout: at the last real token the model should prefer ``yes``
    over ``no`` exactly when ``example.label`` (2-way cross-entropy over the two logits).

    Same loop, early stopping and best-weight restore as ``train_ooo``; ``examples`` are
    ``LabelExample``-like objects with ``text`` and ``label``.
    """
    cfg = _prepare(model, cfg)
    train_examples = _check_split(train_examples, "train split")
    val_examples = _check_split(val_examples, "validation split")
    device = torch.device(cfg.device)
    tokens, lengths, labels = _encode_labels(train_examples, tokenizer, device)
    ids = torch.tensor([tokenizer.no_id, tokenizer.yes_id], device=device)

    def batch_step(idx: Tensor) -> tuple[Tensor, int]:
        ln = lengths[idx]
        logits = label_logits(model, tokens[idx, : int(ln.max())], ln)[:, ids]  # [b, 2]
        loss = F.cross_entropy(logits, labels[idx])
        return loss, int((logits.detach().argmax(-1) == labels[idx]).sum())

    def val_accuracy() -> float:
        return label_accuracy(model, val_examples, tokenizer, cfg.eval_batch_size)

    return _fit(model, tokens.shape[0], batch_step, val_accuracy, cfg, "train_label")
