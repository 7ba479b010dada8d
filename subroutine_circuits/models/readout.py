"""Readouts: sequence embeddings, odd-one-out scores and label-token logits.

All readouts take right-padded token batches plus the true lengths. Padded *key* positions are
masked out of every attention pattern by a temporary hook on each ``blocks.{l}.attn.
hook_attn_scores`` (TransformerLens 3.9 ignores ``attention_mask`` for bidirectional
attention, so a hook is the one mechanism that works for causal and bidirectional models
alike). The hook is added only for the duration of the call with ``model.hooks(...)``, which
removes exactly the hooks it added: masks and patching hooks other code has put on the model
stay and fire as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from subroutine_circuits.models.presets import POOL_ATTR, POOLS
from subroutine_circuits.utils import real_positions

ATTN_SCORES_SUFFIX = "attn.hook_attn_scores"


def _is_encoder(model: Any) -> bool:
    """True for a TransformerLens ``HookedEncoder`` (BERT-style, no ``ln_final``)."""
    return type(model).__name__ == "HookedEncoder" or (
        hasattr(model, "encoder_output") and hasattr(model, "mlm_head")
    )


def resolve_pool(model: Any, pool: str | None) -> str:
    """The pooling to use: ``pool`` if given, else the model's ``sc_pool`` attribute, else last."""
    pool = pool if pool is not None else getattr(model, POOL_ATTR, "last")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {list(POOLS)}")
    return pool


def check_tokens(
    model: Any, tokens: Int[Tensor, "n pos"], lengths: Int[Tensor, "n"]
) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n"]]:
    """Validate a right-padded batch and move it to the model's device.

    Raises ``ValueError`` for wrong ranks, mismatched batch sizes, empty batches, lengths outside
    ``[1, pos]``, sequences longer than ``n_ctx`` or token ids outside the vocabulary.
    """
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError(
            f"tokens must be a 2-d [n, pos] tensor, got {getattr(tokens, 'shape', tokens)}"
        )
    lengths = torch.as_tensor(lengths)
    if lengths.ndim != 1 or lengths.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"lengths must be 1-d with one entry per sequence: tokens {tuple(tokens.shape)}, "
            f"lengths {tuple(lengths.shape)}"
        )
    if tokens.shape[0] == 0:
        raise ValueError("empty batch: tokens has 0 sequences")
    if tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    pos = tokens.shape[1]
    if int(lengths.min()) < 1 or int(lengths.max()) > pos:
        raise ValueError(
            f"lengths must lie in [1, {pos}], got min {int(lengths.min())} max {int(lengths.max())}"
        )
    if pos > model.cfg.n_ctx:
        raise ValueError(f"sequence length {pos} exceeds the model's n_ctx {model.cfg.n_ctx}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(
            f"token ids must lie in [0, {model.cfg.d_vocab}), got range "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    device = model.cfg.device
    return tokens.to(device).long(), lengths.to(device).long()


def key_padding_mask(lengths: Int[Tensor, "n"], pos: int) -> Bool[Tensor, "n pos"]:
    """``True`` where a position is padding (index >= length): ``~utils.real_positions``."""
    return ~real_positions(lengths, pos)


@contextmanager
def padding_masked(model: Any, lengths: Int[Tensor, "n"], pos: int):
    """Context in which every attention layer ignores keys at positions >= ``lengths``.

    Adds one hook per ``hook_attn_scores`` through ``model.hooks``; on exit only these hooks
    are removed.
    """
    pad = key_padding_mask(lengths, pos)  # [n, key_pos]

    def mask_scores(scores: Float[Tensor, "n head q k"], hook: Any) -> Float[Tensor, "n head q k"]:
        # scores: [batch, head_index, query_pos, key_pos]
        return scores.masked_fill(pad[:, None, None, :], float("-inf"))

    with model.hooks(fwd_hooks=[(lambda name: name.endswith(ATTN_SCORES_SUFFIX), mask_scores)]):
        yield model


def _final_resid(
    model: Any, tokens: Int[Tensor, "n pos"], lengths: Int[Tensor, "n"]
) -> Float[Tensor, "n pos d_model"]:
    """The normalised final residual stream (``ln_final`` output; for encoders the last block)."""
    pos = tokens.shape[1]
    with padding_masked(model, lengths, pos):
        if _is_encoder(model):
            one_zero = (~key_padding_mask(lengths, pos)).long()
            return model.encoder_output(tokens, None, one_zero)
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        # normalization_type=None models (e.g. the planted ground-truth models) have no ln_final
        ln_final = getattr(model, "ln_final", None)
        return ln_final(resid) if ln_final is not None else resid


def pool_positions(
    resid: Float[Tensor, "n pos d"], lengths: Int[Tensor, "n"], pool: str
) -> Float[Tensor, "n d"]:
    """Gather the last real position (``"last"``) or average the real positions (``"mean"``)."""
    if pool == "last":
        idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, resid.shape[-1])
        return resid.gather(1, idx).squeeze(1)
    if pool == "mean":
        keep = (~key_padding_mask(lengths, resid.shape[1])).to(resid.dtype)  # [n, pos]
        return (resid * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    raise ValueError(f"unknown pool {pool!r}; choose one of {list(POOLS)}")


def final_hidden(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    lengths: Int[Tensor, "n"],
    pool: str | None = None,
) -> Float[Tensor, "n d_model"]:
    """Sequence embeddings of a right-padded batch.

    Runs the model up to its last block with padded keys masked (any hooks already on the
    model fire), applies ``ln_final`` and returns the hidden state at the last real token
    (``pool="last"``) or the mean over real tokens (``pool="mean"``). ``pool=None`` uses the
    model's ``sc_pool`` attribute (set by ``make_model``), else ``"last"``. Works for
    ``HookedTransformer`` (causal or bidirectional) and ``HookedEncoder``. Gradients flow.
    """
    pool = resolve_pool(model, pool)
    tokens, lengths = check_tokens(model, tokens, lengths)
    resid = _final_resid(model, tokens, lengths)
    return pool_positions(resid, lengths, pool)


def ooo_scores(emb: Float[Tensor, "b 4 d"]) -> Float[Tensor, "b 4"]:
    """Odd-one-out logits: L2-normalise and score ``x_i`` by ``-sum_{j != i} <x_i, x_j>``.

    The stimulus least similar to the others gets the highest score; train with 4-way
    cross-entropy against the odd index.
    """
    if emb.ndim != 3:
        raise ValueError(f"emb must be [b, n_stimuli, d], got shape {tuple(emb.shape)}")
    x = F.normalize(emb, dim=-1)
    gram = x @ x.transpose(-1, -2)  # [b, 4, 4]
    return -(gram.sum(-1) - gram.diagonal(dim1=-2, dim2=-1))


def flat_stimuli(problems: Sequence[Any]) -> tuple[list[Any], int]:
    """The stimuli of odd-one-out problems in one list (problem by problem) and the number of
    stimuli per problem; raises ValueError for an empty list, problems of unequal size or an
    ``odd_index`` outside the problem."""
    problems = list(problems)
    if not problems:
        raise ValueError("no problems to encode (empty split?)")
    n_stim = len(problems[0].stimuli)
    stimuli: list[Any] = []
    for i, p in enumerate(problems):
        if len(p.stimuli) != n_stim:
            raise ValueError(
                f"problem {i} has {len(p.stimuli)} stimuli, expected {n_stim} like problem 0"
            )
        if not 0 <= p.odd_index < n_stim:
            raise ValueError(f"problem {i} has odd_index {p.odd_index} outside [0, {n_stim})")
        stimuli.extend(p.stimuli)
    return stimuli, n_stim


def encode_problems(
    problems: Sequence[Any], tokenizer: Any
) -> tuple[Int[Tensor, "b 4 pos"], Int[Tensor, "b 4"], Int[Tensor, "b"]]:
    """Tokenise OOO problems: ``(tokens [b,4,pos] right-padded, lengths [b,4], odd [b])``.

    ``problems`` are ``OOOProblem``-like objects with ``stimuli`` (texts) and ``odd_index``.
    """
    problems = list(problems)
    texts, n_stim = flat_stimuli(problems)
    tokens, lengths = tokenizer.encode_batch(texts)
    tokens = torch.as_tensor(tokens).long()
    lengths = torch.as_tensor(lengths).long()
    b = len(problems)
    odd = torch.tensor([p.odd_index for p in problems], dtype=torch.long)
    return tokens.view(b, n_stim, -1), lengths.view(b, n_stim), odd


def ooo_logits(
    model: Any,
    tokens: Int[Tensor, "b 4 pos"],
    lengths: Int[Tensor, "b 4"],
    pool: str | None = None,
) -> Float[Tensor, "b 4"]:
    """OOO logits for already-encoded problems (one forward pass; gradients flow).

    Trailing all-padding columns are trimmed first so short batches run fast.
    """
    b, k, pos = tokens.shape
    max_len = int(lengths.max())
    flat_tokens = tokens[..., :max_len].reshape(b * k, max_len)
    emb = final_hidden(model, flat_tokens, lengths.reshape(b * k), pool)
    return ooo_scores(emb.view(b, k, -1))


@torch.no_grad()
def ooo_logits_for_problems(
    model: Any,
    problems: Sequence[Any],
    tokenizer: Any,
    pool: str | None = None,
    batch_size: int = 256,
) -> Float[Tensor, "b 4"]:
    """OOO logits for a list of problems, batched, under ``no_grad`` (hooks on the model fire).

    Returned on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens, lengths, _ = encode_problems(problems, tokenizer)
    out = [
        ooo_logits(model, tokens[i : i + batch_size], lengths[i : i + batch_size], pool).cpu()
        for i in range(0, tokens.shape[0], batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def ooo_accuracy(
    model: Any,
    problems: Sequence[Any],
    tokenizer: Any,
    pool: str | None = None,
    batch_size: int = 256,
) -> float:
    """Fraction of problems whose highest OOO score is at ``odd_index`` (chance 0.25)."""
    logits = ooo_logits_for_problems(model, problems, tokenizer, pool, batch_size)
    odd = torch.tensor([p.odd_index for p in problems], dtype=torch.long)
    return float((logits.argmax(-1) == odd).float().mean())


def full_logits(
    model: Any, tokens: Int[Tensor, "n pos"], lengths: Int[Tensor, "n"]
) -> Float[Tensor, "n pos vocab"]:
    """Logits at every position with padded keys masked (``HookedTransformer`` or encoder)."""
    tokens, lengths = check_tokens(model, tokens, lengths)
    pos = tokens.shape[1]
    with padding_masked(model, lengths, pos):
        if _is_encoder(model):
            one_zero = (~key_padding_mask(lengths, pos)).long()
            return model(tokens, one_zero_attention_mask=one_zero)
        return model(tokens)


def label_logits(
    model: Any, tokens: Int[Tensor, "n pos"], lengths: Int[Tensor, "n"]
) -> Float[Tensor, "n vocab"]:
    """Vocabulary logits at the last real position (label-token readout, e.g. yes/no)."""
    logits = full_logits(model, tokens, lengths)
    lengths = torch.as_tensor(lengths).to(logits.device).long()
    idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
    return logits.gather(1, idx).squeeze(1)


def label_logit_diff(
    logits: Float[Tensor, "n vocab"], yes_id: int, no_id: int
) -> Float[Tensor, "n"]:
    """``logit[yes] - logit[no]`` per sequence (positive = the model prefers ``yes``)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [n, vocab], got shape {tuple(logits.shape)}")
    for name, i in (("yes_id", yes_id), ("no_id", no_id)):
        if not 0 <= i < logits.shape[-1]:
            raise ValueError(f"{name} {i} outside the vocabulary [0, {logits.shape[-1]})")
    return logits[:, yes_id] - logits[:, no_id]
