"""Objectives: what a mask search, patching and the frontier measure on a batch.

An :class:`Objective` says how a masked model is scored on a batch of its data: a
differentiable ``loss`` for the mask search and a ``score`` in ``[0, 1]`` (higher is better) for
choosing a mask on validation data. One objective serves the mask search and, for prompt pairs,
activation / attribution patching and the faithfulness-size frontier
(:func:`patch_metric`), so that a learned mask and a patching circuit are compared under the
same metric.

- :class:`OddOneOut`: the study's readout (4-way cross-entropy / accuracy on odd-one-out
  problems, :class:`~subroutine_circuits.adapters.base.EncodedProblems`). Masks ablate with the
  study's ablator.
- :class:`LogitDiff`: on :class:`PromptPairs` (a clean prompt, its corrupted twin, the answer
  token and the wrong token), the logit difference ``logit[answer] - logit[wrong]`` at the clean
  prompt's last token. The loss is the two-way cross-entropy ``softplus(-logit_diff)``
  (``-log p(answer | answer or wrong)``), which stops rewarding a pair once the answer clearly
  wins, so that the L0 penalty, not an ever larger margin, decides which units stay; the score
  is the share of pairs whose answer wins.
- :class:`KLToFull`: on prompt pairs, the KL divergence of the masked model's next-token
  distribution at the readout position from the full model's; the score is the share of
  prompts whose top token is the full model's.
- :class:`PairMetric`: a user's metric ``fn(logits [n, vocab], pairs) -> [n]`` (higher is
  better); loss ``-mean(fn)``, score the share above ``threshold``.

On prompt pairs a removed unit takes its activation on the *corrupted* prompt (interchange,
"resample" ablation: the convention of activation patching and of MIB's faithfulness), so a mask
keeps what carries the clean prompt's answer.

Padding: prompts of different lengths are right-padded; the readout position of each pair is its
last real token. For causal models that is exact (no position attends to a later one); a
bidirectional model needs pairs of one length, and a :class:`PromptPairs` with padding is refused
for it by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "OBJECTIVES",
    "KLToFull",
    "LogitDiff",
    "Objective",
    "OddOneOut",
    "PairMetric",
    "PromptPairs",
    "make_prompt_pairs",
    "resolve_objective",
]


# ----------------------------------------------------------------------------- data


@dataclass
class PromptPairs:
    """Clean / corrupted prompts (right-padded token ids), the readout position of each pair
    (the clean prompt's last real token) and the answer / wrong token ids."""

    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    positions: Int[Tensor, " n"]
    answer: Int[Tensor, " n"]
    wrong: Int[Tensor, " n"]
    #: what the frozen model computes on these pairs, per pair (set by
    #: :meth:`PairObjective.prepare`): corrupted-prompt activations by hook name and, under
    #: ``FULL_KEY``, the full model's readout logits; sliced along with the pairs
    frozen: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.clean.ndim != 2 or self.clean.shape != self.corrupted.shape:
            raise ValueError(
                f"clean and corrupted prompts must be [n, pos] of one shape, got "
                f"{tuple(self.clean.shape)} and {tuple(self.corrupted.shape)}"
            )
        n, pos = self.clean.shape
        if n == 0:
            raise ValueError("no prompt pairs")
        for name in ("positions", "answer", "wrong"):
            t = getattr(self, name)
            if t.ndim != 1 or t.shape[0] != n:
                raise ValueError(f"{name} must be [{n}], got {tuple(t.shape)}")
        if int(self.positions.min()) < 0 or int(self.positions.max()) >= pos:
            raise ValueError(f"readout positions must lie in [0, {pos})")

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the tensors are."""
        return self.clean.device

    @property
    def padded(self) -> bool:
        """Whether any pair is shorter than the longest (right padding in use)."""
        return bool((self.positions != self.clean.shape[1] - 1).any())

    def to(self, device: str | torch.device) -> PromptPairs:
        """All tensors on ``device``."""
        return self._map(lambda t: t.to(device))

    def batch(self, idx: Tensor) -> PromptPairs:
        """The pairs at ``idx``."""
        return self._map(lambda t: t[idx.to(t.device)])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> PromptPairs:
        """``fn`` applied to every per-pair tensor (the frozen cache too)."""
        out = PromptPairs(*(fn(getattr(self, f)) for f in _FIELDS))
        out.frozen = {k: fn(v) for k, v in self.frozen.items()}
        return out

    def split(self, n_val: int, seed: int = 0) -> tuple[PromptPairs, PromptPairs]:
        """A random ``(train, val)`` split with ``n_val`` pairs for validation."""
        if not 0 < n_val < len(self):
            raise ValueError(f"n_val must be in [1, {len(self) - 1}], got {n_val}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        perm = perm.to(self.device)
        return self.batch(perm[n_val:]), self.batch(perm[:n_val])


_FIELDS = ("clean", "corrupted", "positions", "answer", "wrong")
#: the key of the full model's readout logits in ``PromptPairs.frozen``
FULL_KEY = "__full__"

#: One pair as text: ``(clean prompt, corrupted prompt, answer, wrong answer)``.
TextPair = tuple[str, str, str, str]


def _text_tokenizer(adapter: Any, tokenizer: Any) -> Callable[[str, bool], list[int]]:
    """``encode(text, prompt) -> ids``: prompts get the model's start token, answers do not."""
    tok = tokenizer if tokenizer is not None else getattr(adapter, "tokenizer", None)
    if tok is not None and hasattr(tok, "stoi"):  # the library's word tokenizer
        return lambda text, prompt: tok.encode(text, add_bos=prompt, add_eos=False)
    if tokenizer is not None:  # a Hugging Face tokenizer (its own special tokens) or a callable
        if hasattr(tokenizer, "encode"):
            return lambda text, prompt: [int(i) for i in tokenizer.encode(text)]
        if callable(tokenizer):
            return lambda text, prompt: [int(i) for i in tokenizer(text)]
        raise ValueError(f"tokenizer= must encode texts, got {type(tokenizer).__name__}")
    model = adapter.model
    if hasattr(model, "to_tokens") and getattr(model, "tokenizer", None) is not None:

        def encode(text: str, prompt: bool) -> list[int]:
            return [int(i) for i in model.to_tokens(text, prepend_bos=prompt)[0]]

        return encode
    raise ValueError(
        "make_prompt_pairs cannot tokenize texts for this model: pass tokenizer= (a callable "
        "text -> token ids) or token-id pairs"
    )


def make_prompt_pairs(
    model: Any,
    pairs: Sequence[TextPair] | Sequence[tuple[Sequence[int], Sequence[int], int, int]],
    *,
    tokenizer: Any = None,
) -> PromptPairs:
    """Prompt pairs from ``(clean, corrupted, answer, wrong)`` texts or token ids.

    Texts are tokenized with ``tokenizer`` (a Hugging Face tokenizer's ``encode``, with its own
    special tokens, or a callable ``text -> ids``), else the adapter's word tokenizer, else the
    model's own (``model.to_tokens``). Each answer must be one token and a
    pair's two prompts must have the same length (their tokens are compared position by
    position); each is refused by name otherwise.
    """
    from subroutine_circuits.adapters import as_adapter

    adapter = as_adapter(model)
    if len(pairs) == 0:
        raise ValueError("make_prompt_pairs: no pairs given")
    encode = None
    rows: list[tuple[list[int], list[int], int, int]] = []
    for i, pair in enumerate(pairs):
        if len(pair) != 4:
            raise ValueError(f"pair {i} has {len(pair)} entries; expected (clean, corrupted, "
                             "answer, wrong)")  # fmt: skip
        clean, corr, ans, wrong = pair
        if isinstance(clean, str):
            encode = encode or _text_tokenizer(adapter, tokenizer)
            c_ids, k_ids = encode(clean, True), encode(corr, True)
            a_ids, w_ids = encode(ans, False), encode(wrong, False)
            for what, text, ids in (("answer", ans, a_ids), ("wrong answer", wrong, w_ids)):
                if len(ids) != 1:
                    hint = (
                        ""
                        if text.startswith(" ")
                        else (
                            " (answers are tokenized as given: GPT-2-style tokenizers want the "
                            f"leading space, {' ' + text!r})"
                        )
                    )
                    raise ValueError(
                        f"pair {i}: the {what} {text!r} is {len(ids)} tokens; a logit "
                        f"difference needs one{hint}"
                    )
            a, w = a_ids[0], w_ids[0]
        else:
            c_ids, k_ids, a, w = (
                [int(t) for t in clean],
                [int(t) for t in corr],
                int(ans),
                int(wrong),
            )
        if len(c_ids) != len(k_ids):
            raise ValueError(
                f"pair {i}: the clean prompt has {len(c_ids)} tokens, the corrupted one "
                f"{len(k_ids)}; a pair must align token by token"
            )
        if not c_ids:
            raise ValueError(f"pair {i}: empty prompt")
        rows.append((c_ids, k_ids, a, w))
    from subroutine_circuits.tasks.tokenizer import pad_batch

    clean_t, lengths = pad_batch([r[0] for r in rows], pad_id=0)
    corr_t, _ = pad_batch([r[1] for r in rows], pad_id=0)
    out = PromptPairs(
        clean_t,
        corr_t,
        lengths - 1,
        torch.tensor([r[2] for r in rows]),
        torch.tensor([r[3] for r in rows]),
    )
    check_pairs_for(adapter, out)
    return out.to(adapter.device)


def check_pairs_for(adapter: Any, pairs: PromptPairs) -> None:
    """Refuse right-padded pairs on a model whose positions see later ones, and token ids
    outside its vocabulary."""
    if pairs.padded and not getattr(adapter, "causal", False):
        raise ValueError(
            "prompt pairs of different lengths are right-padded, which is exact only for a "
            "causal model; give this (bidirectional) model pairs of one length"
        )
    vocab = getattr(getattr(adapter.model, "cfg", None), "d_vocab", None)
    if vocab is not None:
        top = max(int(pairs.clean.max()), int(pairs.corrupted.max()), int(pairs.answer.max()),
                  int(pairs.wrong.max()))  # fmt: skip
        if top >= int(vocab):
            raise ValueError(f"token id {top} outside the model's vocabulary of {vocab}")


# ----------------------------------------------------------------------------- objectives


class Objective(ABC):
    """What the mask search optimises and scores (see the module docstring)."""

    #: the objective's name in tables and file names
    name: str = "objective"
    #: the ablation its masks use (None: the study's ablator)
    ablation: str | None = None

    @abstractmethod
    def loss(self, adapter: Any, mask: Any, batch: Any) -> Tensor:
        """Differentiable scalar loss of the model with ``mask`` applied on ``batch``."""

    @abstractmethod
    def score(self, adapter: Any, data: Any, mask: Any = None) -> float:
        """Validation score in ``[0, 1]`` (higher is better) of the model under ``mask``."""


class OddOneOut(Objective):
    """The study's odd-one-out readout: 4-way cross-entropy, accuracy as the score."""

    name = "odd_one_out"

    def loss(self, adapter: Any, mask: Any, batch: Any) -> Tensor:
        with mask.applied(adapter.model):
            scores = adapter.ooo_logits(batch.inputs)
        return F.cross_entropy(scores, batch.odd)

    def score(self, adapter: Any, data: Any, mask: Any = None) -> float:
        return adapter.accuracy(data, mask)


def _gather_readout(
    logits: Float[Tensor, "... n pos vocab"], positions: Int[Tensor, " n"]
) -> Float[Tensor, "... n vocab"]:
    """Logits at each pair's readout position (leading copy dims kept)."""
    idx = positions.to(logits.device).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
    idx = idx.expand(*logits.shape[:-3], *idx.shape)
    return logits.gather(-2, idx).squeeze(-2)


def _adapter(model: Any) -> Any:
    """The model's adapter (an adapter as is)."""
    from subroutine_circuits.adapters import as_adapter

    return as_adapter(model)


def _corrupted_acts(adapter: Any, pairs: PromptPairs, hook_names: Sequence[str]) -> dict:
    """Activations at ``hook_names`` on the corrupted prompts: from the pairs' frozen cache,
    else one recorded pass (``adapter.record_activations``, chunked within the memory
    budget)."""
    if all(h in pairs.frozen for h in hook_names):
        return {h: pairs.frozen[h] for h in hook_names}
    with torch.no_grad():
        return adapter.record_activations(pairs.corrupted, list(hook_names)).acts


class PairObjective(Objective):
    """An objective on :class:`PromptPairs` through a per-pair metric (higher is better)."""

    ablation = "resample"
    #: whether :meth:`metric` needs the full model's readout logits
    needs_full: bool = False

    @abstractmethod
    def metric(
        self,
        logits: Float[Tensor, "... n vocab"],
        pairs: PromptPairs,
        full: Float[Tensor, "n vocab"] | None,
    ) -> Float[Tensor, "... n"]:
        """Per-pair metric of readout logits (leading copy dims kept); higher is better."""

    @abstractmethod
    def pair_loss(
        self, logits: Float[Tensor, "n vocab"], pairs: PromptPairs, full: Tensor | None
    ) -> Tensor:
        """Scalar loss of readout logits."""

    @abstractmethod
    def success(
        self, logits: Float[Tensor, "n vocab"], pairs: PromptPairs, full: Tensor | None
    ) -> Tensor:
        """Boolean per pair: the masked model does what the objective asks."""

    def prepare(self, adapter: Any, pairs: PromptPairs, hook_names: Sequence[str]) -> PromptPairs:
        """``pairs`` with the frozen model's per-pair results cached (corrupted activations at
        ``hook_names``, the full model's readout logits when the metric needs them), so that
        mask training does not run the unmasked model again at every step."""
        adapter = _adapter(adapter)
        out = pairs._map(lambda t: t)
        out.frozen = dict(_corrupted_acts(adapter, pairs, hook_names))
        full = self._full(adapter, pairs)
        if full is not None:
            out.frozen[FULL_KEY] = full
        return out

    def _full(self, adapter: Any, pairs: PromptPairs) -> Tensor | None:
        if not self.needs_full:
            return None
        if FULL_KEY in pairs.frozen:
            return pairs.frozen[FULL_KEY]
        with torch.no_grad():
            return _gather_readout(adapter.model(pairs.clean), pairs.positions)

    def _masked(self, adapter: Any, mask: Any, pairs: PromptPairs) -> Tensor:
        """Readout logits with ``mask``'s removed units on their corrupted-prompt activation."""
        model = adapter.model
        if mask is None:
            return _gather_readout(model(pairs.clean), pairs.positions)
        if getattr(mask, "unit_map", None) is not None and mask.ablation.value == "resample":
            mask.set_resample(_corrupted_acts(adapter, pairs, mask.unit_map.hook_names()))
        with mask.applied(model):
            return _gather_readout(model(pairs.clean), pairs.positions)

    def loss(self, adapter: Any, mask: Any, batch: PromptPairs) -> Tensor:
        adapter = _adapter(adapter)
        return self.pair_loss(self._masked(adapter, mask, batch), batch, self._full(adapter, batch))

    @torch.no_grad()
    def score(self, adapter: Any, data: PromptPairs, mask: Any = None) -> float:
        adapter = _adapter(adapter)
        ok = self.success(self._masked(adapter, mask, data), data, self._full(adapter, data))
        return float(ok.float().mean())

    @torch.no_grad()
    def values(self, adapter: Any, data: PromptPairs, mask: Any = None) -> Float[Tensor, " n"]:
        """The per-pair metric of the model under ``mask`` (None: the full model)."""
        adapter = _adapter(adapter)
        return self.metric(self._masked(adapter, mask, data), data, self._full(adapter, data))

    def patch_metric(self, adapter: Any, pairs: PromptPairs) -> Callable[[Tensor], Tensor]:
        """The metric as patching takes it: vocabulary logits ``[..., n, pos, vocab]`` of a run
        on ``pairs``' prompts to ``[..., n]`` (for activation / attribution patching, circuit
        faithfulness and the frontier)."""
        full = self._full(_adapter(adapter), pairs)
        positions = pairs.positions

        def fn(logits: Tensor) -> Tensor:
            return self.metric(_gather_readout(logits, positions), pairs, full)

        return fn


def _pick(logits: Tensor, ids: Tensor) -> Tensor:
    """``logits[..., i, ids[i]]`` for every pair ``i``."""
    idx = ids.to(logits.device).expand(*logits.shape[:-1]).unsqueeze(-1)
    return logits.gather(-1, idx).squeeze(-1)


class LogitDiff(PairObjective):
    """``logit[answer] - logit[wrong]`` at the readout position (see the module docstring)."""

    name = "logit_diff"

    def metric(self, logits, pairs, full):
        return _pick(logits, pairs.answer) - _pick(logits, pairs.wrong)

    def pair_loss(self, logits, pairs, full):
        return F.softplus(-self.metric(logits, pairs, full)).mean()

    def success(self, logits, pairs, full):
        return self.metric(logits, pairs, full) > 0


class KLToFull(PairObjective):
    """KL divergence from the full model's next-token distribution at the readout position;
    the metric is its negative (higher is better)."""

    name = "kl"
    needs_full = True

    def _kl(self, logits: Tensor, full: Tensor) -> Tensor:
        logp = F.log_softmax(logits.float(), -1)
        logq = F.log_softmax(full.float().to(logits.device), -1)
        return (logq.exp() * (logq - logp)).sum(-1)

    def metric(self, logits, pairs, full):
        return -self._kl(logits, full)

    def pair_loss(self, logits, pairs, full):
        return self._kl(logits, full).mean()

    def success(self, logits, pairs, full):
        return logits.argmax(-1) == full.to(logits.device).argmax(-1)


class PairMetric(PairObjective):
    """A user's metric ``fn(logits [..., n, vocab], pairs) -> [..., n]`` (higher is better):
    loss ``-mean(fn)``, success ``fn > threshold``."""

    def __init__(self, fn: Callable[[Tensor, PromptPairs], Tensor], *, threshold: float = 0.0,
                 name: str = "metric") -> None:  # fmt: skip
        if not callable(fn):
            raise ValueError(f"PairMetric needs a callable, got {type(fn).__name__}")
        self.fn, self.threshold, self.name = fn, float(threshold), name

    def metric(self, logits, pairs, full):
        out = self.fn(logits, pairs)
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"the metric {self.name!r} must return one value per pair "
                f"{tuple(logits.shape[:-1])}, got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out

    def pair_loss(self, logits, pairs, full):
        return -self.metric(logits, pairs, full).mean()

    def success(self, logits, pairs, full):
        return self.metric(logits, pairs, full) > self.threshold


#: objectives by name (prompt-pair objectives; the study's readout is ``odd_one_out``)
OBJECTIVES: dict[str, type[Objective]] = {
    "odd_one_out": OddOneOut,
    "logit_diff": LogitDiff,
    "kl": KLToFull,
}


def resolve_objective(objective: str | Objective | Callable[..., Tensor]) -> Objective:
    """An objective by name, an :class:`Objective` as is, or a callable metric as
    :class:`PairMetric`."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
        return OBJECTIVES[objective]()
    if callable(objective):
        return PairMetric(objective)
    raise ValueError(f"an objective is a name, an Objective or a callable, got {objective!r}")
