"""Self-supervised pretraining on an unlabelled text corpus.

Causal models learn next-token prediction; bidirectional ones (``attention_dir ==
"bidirectional"`` or a ``HookedEncoder``) learn masked-token prediction, BERT-style: of the
chosen positions (each real non-BOS token with probability ``mask_prob``) 80% become
``[MASK]``, 10% a random token and 10% stay, and the loss is taken on the chosen positions.
Padding never enters the loss, and padded keys are masked out of attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from subroutine_circuits.models.loop import (
    BaseTrainer,
    LoopConfig,
    trainable_parameters,
    warmup_schedule,
)
from subroutine_circuits.models.readout import _is_encoder, full_logits

OBJECTIVES = ("auto", "clm", "mlm")


@dataclass
class PretrainConfig(LoopConfig):
    """Settings for ``pretrain`` (defaults pretrain a tiny model in seconds on CPU).

    AdamW at ``lr`` (linear warm-up over ``warmup_steps``, then constant); the shared fields
    (``lr``, ``weight_decay``, ``batch_size`` (sentences per step), ``seed`` (batch sampling
    and masking), ``device``, ``time_limit_s``, ``progress``, ``grad_clip``,
    ``warmup_steps``) are :class:`~subroutine_circuits.models.loop.LoopConfig`'s.

    Args:
        steps: optimiser steps.
        mask_prob: fraction of real tokens chosen for the masked-token objective.
        objective: ``"auto"`` (``"clm"`` for causal models, ``"mlm"`` for bidirectional ones),
            ``"clm"`` or ``"mlm"``.
    """

    batch_size: int = 64
    steps: int = 300
    mask_prob: float = 0.15
    objective: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        super().validate()
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"PretrainConfig.steps must be an int >= 1, got {self.steps!r}")
        if not 0 < self.mask_prob <= 1:
            raise ValueError(f"PretrainConfig.mask_prob must be in (0, 1], got {self.mask_prob!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"PretrainConfig.objective must be one of {list(OBJECTIVES)}, "
                f"got {self.objective!r}"
            )


def resolve_objective(model: Any, objective: str = "auto") -> str:
    """``"clm"`` or ``"mlm"``: the explicit choice, or the one that fits the attention pattern."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if objective != "auto":
        if objective == "clm" and (
            _is_encoder(model) or model.cfg.attention_dir == "bidirectional"
        ):
            raise ValueError("next-token (clm) pretraining needs a causal model, got a "
                             "bidirectional one: use objective 'mlm'")  # fmt: skip
        return objective
    if _is_encoder(model) or model.cfg.attention_dir == "bidirectional":
        return "mlm"
    return "clm"


def encode_corpus(
    corpus: Sequence[str], tokenizer: Any, n_ctx: int
) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n"]]:
    """Tokenise a corpus (right-padded), truncating sentences longer than ``n_ctx`` tokens."""
    corpus = list(corpus) if corpus is not None else []
    if not corpus:
        raise ValueError("empty corpus: nothing to pretrain on")
    tokens, lengths = tokenizer.encode_batch(corpus)
    tokens = torch.as_tensor(tokens).long()[:, :n_ctx]
    lengths = torch.as_tensor(lengths).long().clamp(max=n_ctx)
    if int(lengths.max()) < 2:
        raise ValueError("corpus sentences are empty (every sequence has < 2 tokens)")
    return tokens, lengths


def mlm_corrupt(
    tokens: Int[Tensor, "n pos"],
    lengths: Int[Tensor, "n"],
    mask_id: int,
    vocab_size: int,
    mask_prob: float,
    generator: torch.Generator,
) -> tuple[Int[Tensor, "n pos"], Bool[Tensor, "n pos"]]:
    """BERT-style corruption: returns (corrupted tokens, chosen positions).

    Candidates are real tokens after position 0 (BOS); each is chosen with ``mask_prob`` and at
    least one per sequence (when it has a candidate). Chosen tokens become ``mask_id`` (80%), a
    random id in ``[1, vocab_size)`` (10%) or stay (10%). All randomness comes from
    ``generator`` (CPU).
    """
    n, pos = tokens.shape
    ar = torch.arange(pos)[None, :]
    cand = (ar >= 1) & (ar < lengths[:, None])
    chosen = (torch.rand(n, pos, generator=generator) < mask_prob) & cand
    # force one chosen position in sequences that drew none
    none = ~chosen.any(1) & cand.any(1)
    if none.any():
        scores = torch.rand(n, pos, generator=generator).masked_fill(~cand, -1.0)
        forced = torch.zeros_like(chosen)
        forced[torch.arange(n), scores.argmax(1)] = True
        chosen |= forced & none[:, None]
    r = torch.rand(n, pos, generator=generator)
    random_ids = torch.randint(1, vocab_size, (n, pos), generator=generator)
    out = tokens.clone()
    out = torch.where(chosen & (r < 0.8), torch.full_like(out, mask_id), out)
    out = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, out)
    return out, chosen


def _batch_loss(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    lengths: Int[Tensor, "n"],
    objective: str,
    mask_id: int | None,
    mask_prob: float,
    generator: torch.Generator,
) -> tuple[Tensor, int]:
    """Mean loss over the predicted tokens of one CPU batch, and how many tokens that was."""
    device = torch.device(model.cfg.device)
    max_len = int(lengths.max())
    tokens = tokens[:, :max_len]
    if objective == "clm":
        logits = full_logits(model, tokens.to(device), lengths.to(device))
        target = tokens[:, 1:].to(device)
        valid = (torch.arange(1, max_len)[None, :] < lengths[:, None]).to(device)
        target = target.masked_fill(~valid, -100)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
        return loss, int(valid.sum())
    if mask_id is None:
        raise ValueError("masked-token pretraining needs a tokenizer with a mask_id ([MASK])")
    corrupted, chosen = mlm_corrupt(
        tokens, lengths, mask_id, model.cfg.d_vocab, mask_prob, generator
    )
    logits = full_logits(model, corrupted.to(device), lengths.to(device))
    target = tokens.masked_fill(~chosen, -100).to(device)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
    )
    return loss, int(chosen.sum())


@torch.no_grad()
def lm_loss(
    model: Any,
    texts: Sequence[str],
    tokenizer: Any,
    objective: str = "auto",
    mask_prob: float = 0.15,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Token-averaged held-out loss (next-token or masked-token; same masks for the same seed)."""
    objective = resolve_objective(model, objective)
    tokens, lengths = encode_corpus(texts, tokenizer, model.cfg.n_ctx)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        loss, n = _batch_loss(
            model,
            tokens[i : i + batch_size],
            lengths[i : i + batch_size],
            objective,
            getattr(tokenizer, "mask_id", None),
            mask_prob,
            gen,
        )
        if n:
            total += float(loss) * n
            count += n
    if count == 0:
        raise ValueError("no tokens to score in the held-out texts")
    return total / count


class _Pretrainer(BaseTrainer):
    """Pretraining on the one base-model loop: batches of ``cfg.batch_size`` sentences drawn
    without replacement from a shuffled corpus (re-shuffled when too few remain for a whole
    batch), the next-/masked-token loss of :func:`_batch_loss`, one loss per step recorded."""

    def __init__(self, model: Any, tokens: Tensor, lengths: Tensor, objective: str,
                 mask_id: int | None, cfg: PretrainConfig) -> None:  # fmt: skip
        params = trainable_parameters(model)
        optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        super().__init__(
            model, optim, cfg.steps, params=params, grad_clip=cfg.grad_clip,
            sched=warmup_schedule(optim, cfg.warmup_steps), time_limit_s=cfg.time_limit_s,
            progress=cfg.progress, advice=f"PretrainConfig.lr (now {cfg.lr})",
        )  # fmt: skip
        self.desc = f"pretrain ({objective})"
        self.tokens, self.lengths, self.cfg = tokens, lengths, cfg
        self.objective, self.mask_id = objective, mask_id
        self.gen = torch.Generator().manual_seed(cfg.seed)  # batches and masking
        self.losses: list[float] = []

    def batches(self) -> Iterator[Tensor]:
        """Sentence indices, ``cfg.batch_size`` at a time, without replacement."""
        n, bs = self.tokens.shape[0], self.cfg.batch_size
        order, cursor = torch.randperm(n, generator=self.gen), 0
        while True:
            if cursor + bs > n and cursor > 0:
                order, cursor = torch.randperm(n, generator=self.gen), 0
            yield order[cursor : cursor + bs]
            cursor += bs

    def loss(self, batch: Tensor) -> tuple[Tensor, int]:
        """The objective's mean loss over the batch's predicted tokens (and their count)."""
        return _batch_loss(self.model, self.tokens[batch], self.lengths[batch], self.objective,
                           self.mask_id, self.cfg.mask_prob, self.gen)  # fmt: skip

    def after_step(
        self, batch: Any, loss: float, info: Any, bar: Any, last: bool, over_time: bool
    ) -> str | None:
        """Record the step's loss."""
        self.losses.append(loss)
        if (self.step - 1) % 10 == 0:
            bar.set_postfix(loss=f"{self.losses[-1]:.3f}")
        return None


def pretrain(
    model: Any,
    corpus: Sequence[str],
    tokenizer: Any,
    cfg: PretrainConfig | None = None,
) -> dict[str, Any]:
    """Pretrain ``model`` in place on ``corpus`` (next-token or masked-token, see module doc).

    Returns ``{"objective", "losses" (one per step), "steps", "seconds", "final_loss" (mean of
    the last 20 steps)}``. The model is left in eval mode on ``cfg.device``. Raises
    ``ValueError`` for an empty corpus or a non-finite loss.
    """
    cfg = cfg if cfg is not None else PretrainConfig()
    cfg.validate()
    objective = resolve_objective(model, cfg.objective)
    mask_id = getattr(tokenizer, "mask_id", None)
    if objective == "mlm" and mask_id is None:
        raise ValueError("masked-token pretraining needs a tokenizer with a mask_id ([MASK])")
    if str(model.cfg.device) != str(cfg.device):
        model.to(cfg.device, print_details=False)
    tokens, lengths = encode_corpus(corpus, tokenizer, model.cfg.n_ctx)
    trainer = _Pretrainer(model, tokens, lengths, objective, mask_id, cfg)
    trainer.run()
    losses = trainer.losses
    return {
        "objective": objective,
        "losses": losses,
        "steps": len(losses),
        "seconds": trainer.elapsed(),
        "final_loss": float(sum(losses[-20:]) / len(losses[-20:])),
    }
