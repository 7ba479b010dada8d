"""Train a model on odd-one-out (OOO) problems with early stopping on validation accuracy."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from subroutine_circuits.models.loop import (
    EarlyStopConfig,
    EvaluatedTrainer,
    TrainResult,
    trainable_parameters,
)
from subroutine_circuits.models.readout import (
    encode_problems,
    label_logit_diff,
    label_logits,
    ooo_logits,
    resolve_pool,
)


@dataclass
class TrainConfig(EarlyStopConfig):
    """Optimisation settings for ``train_ooo`` (defaults train a tiny model in seconds on CPU).

    AdamW at ``lr`` (linear warm-up over ``warmup_steps``, then constant), early stopping on
    validation accuracy. Every field but ``pool`` is shared by the base-model loops
    (:class:`~subroutine_circuits.models.loop.EarlyStopConfig`): ``batch_size`` counts OOO
    problems per step (4 sequences each), ``seed`` seeds the order of training batches,
    ``time_limit_s`` stops keeping the best weights so far.

    Args:
        pool: sequence readout (``None``: the model's own ``sc_pool``, else ``"last"``).
    """

    pool: str | None = None


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


class _SupervisedTrainer(EvaluatedTrainer):
    """Supervised training of every trainable parameter on ``n_train`` indexed items: AdamW
    with warm-up, epochs of shuffled batches of item indices (``cfg.seed``),
    ``batch_step(indices) -> (loss, n_correct)`` (the count may stay on the device),
    ``val_accuracy()`` as the validation;
    ``.fit()`` trains and returns the :class:`TrainResult`."""

    def __init__(
        self,
        model: Any,
        n_train: int,
        batch_step: Callable[[Tensor], tuple[Tensor, Tensor]],
        val_accuracy: Callable[[], float],
        cfg: TrainConfig,
        desc: str,
    ) -> None:
        params = trainable_parameters(model)
        optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        super().__init__(model, optim, cfg, n_train, params=params,
                         advice=f"TrainConfig.lr (now {cfg.lr}) or check the model")  # fmt: skip
        self.desc, self.n_train, self.cfg = desc, n_train, cfg
        self.batch_step, self.val_accuracy = batch_step, val_accuracy

    def batches(self) -> Iterator[Tensor]:
        """Indices of the training items: every epoch a new permutation, cut into batches."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        while True:
            order = torch.randperm(self.n_train, generator=gen).to(torch.device(self.cfg.device))
            for b in range(0, self.n_train, self.cfg.batch_size):
                yield order[b : b + self.cfg.batch_size]

    def loss(self, batch: Tensor) -> tuple[Tensor, tuple[Tensor, int]]:
        """``batch_step``'s loss, with its correct answers and the batch size."""
        loss, n_correct = self.batch_step(batch)
        return loss, (n_correct, len(batch))

    def validate(self) -> tuple[float, float | None]:
        """``val_accuracy()`` (no validation loss)."""
        return self.val_accuracy(), None


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

    def batch_step(idx: Tensor) -> tuple[Tensor, Tensor]:
        logits = ooo_logits(model, tr_tok[idx], tr_len[idx], pool)
        loss = F.cross_entropy(logits, tr_odd[idx])
        return loss, (logits.detach().argmax(-1) == tr_odd[idx]).sum()

    def val_accuracy() -> float:
        return _encoded_accuracy(model, va_tok, va_len, va_odd, pool, cfg.eval_batch_size)

    return _SupervisedTrainer(
        model, tr_tok.shape[0], batch_step, val_accuracy, cfg, "train_ooo"
    ).fit()


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

    def batch_step(idx: Tensor) -> tuple[Tensor, Tensor]:
        ln = lengths[idx]
        logits = label_logits(model, tokens[idx, : int(ln.max())], ln)[:, ids]  # [b, 2]
        loss = F.cross_entropy(logits, labels[idx])
        return loss, (logits.detach().argmax(-1) == labels[idx]).sum()

    def val_accuracy() -> float:
        return label_accuracy(model, val_examples, tokenizer, cfg.eval_batch_size)

    return _SupervisedTrainer(
        model, tokens.shape[0], batch_step, val_accuracy, cfg, "train_label"
    ).fit()
