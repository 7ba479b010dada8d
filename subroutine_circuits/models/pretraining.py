"""Self-supervised pretraining on an unlabelled text corpus.

Causal models learn next-token prediction; bidirectional ones (``attention_dir ==
"bidirectional"`` or a ``HookedEncoder``) learn masked-token prediction, BERT-style: of the
chosen positions (each real non-BOS token with probability ``mask_prob``) 80% become
``[MASK]``, 10% a random token and 10% stay, and the loss is taken on the chosen positions.
Padding never enters the loss, and padded keys are masked out of attention.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from subroutine_circuits.models.readout import _is_encoder, full_logits
from subroutine_circuits.models.train import _progress, optimizer_step

OBJECTIVES = ("auto", "clm", "mlm")


@dataclass
class PretrainConfig:
    """Settings for ``pretrain`` (defaults pretrain a tiny model in seconds on CPU).

    Args:
        steps: optimiser steps.
        lr: AdamW learning rate (linear warm-up over ``warmup_steps``, then constant).
        batch_size: sentences per step.
        mask_prob: fraction of real tokens chosen for the masked-token objective.
        seed: seeds batch sampling and masking.
        device: where to train; the model is moved there.
        time_limit_s: stop early after this many seconds.
        progress: show a tqdm progress bar.
        objective: ``"auto"`` (``"clm"`` for causal models, ``"mlm"`` for bidirectional ones),
            ``"clm"`` or ``"mlm"``.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        grad_clip: clip the gradient norm (``None``: no clipping).
    """

    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 64
    mask_prob: float = 0.15
    seed: int = 0
    device: str = "cpu"
    time_limit_s: float | None = None
    progress: bool = True
    objective: str = "auto"
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float | None = 1.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PretrainConfig.{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"PretrainConfig.lr must be > 0, got {self.lr!r}")
        if not 0 < self.mask_prob <= 1:
            raise ValueError(f"PretrainConfig.mask_prob must be in (0, 1], got {self.mask_prob!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"PretrainConfig.objective must be one of {list(OBJECTIVES)}, "
                f"got {self.objective!r}"
            )
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"PretrainConfig.time_limit_s must be > 0, got {self.time_limit_s!r}")


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
    n = tokens.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    losses: list[float] = []
    start = time.perf_counter()
    bar = _progress(cfg.steps, cfg.progress, f"pretrain ({objective})")
    order = torch.randperm(n, generator=gen)
    cursor = 0
    model.train()
    try:
        for step in range(cfg.steps):
            if cursor + cfg.batch_size > n and cursor > 0:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + cfg.batch_size]
            cursor += cfg.batch_size
            loss, _ = _batch_loss(
                model, tokens[idx], lengths[idx], objective, mask_id, cfg.mask_prob, gen
            )
            optimizer_step(loss, optim, params, cfg.grad_clip, sched, step=step,
                           advice=f"PretrainConfig.lr (now {cfg.lr})")  # fmt: skip
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if cfg.time_limit_s is not None and time.perf_counter() - start > cfg.time_limit_s:
                break
    finally:
        bar.close()
        model.eval()
    return {
        "objective": objective,
        "losses": losses,
        "steps": len(losses),
        "seconds": time.perf_counter() - start,
        "final_loss": float(sum(losses[-20:]) / len(losses[-20:])),
    }
