"""A Hugging Face tokenizer for task stimuli: word spans, a constant readout token, pair alignment.

:class:`HFTaskTokenizer` wraps the tokenizer saved in a model's folder (subword: BPE, WordPiece,
SentencePiece) and gives it the interface the tasks use (``encode``, ``encode_batch`` ->
right-padded ``(tokens, lengths)``), plus what subword tokenisation needs:

- every stimulus ends with a constant **readout token**, end-of-text for causal models, ``[SEP]``
  for encoders, so that no word reaches the readout position only through the residual stream;
  causal models also start with their BOS token when they have one, encoders with ``[CLS]``;
- the text is split into words on whitespace, and each word's token span is known
  (:meth:`HFTaskTokenizer.word_spans`);
- :meth:`HFTaskTokenizer.align_pair` aligns the two stimuli of a minimal pair position by
  position, a word's tokens together, or says why it cannot (the caller counts those pairs).

Words are tokenised in the context of the whole text (the tokenizer's own offsets decide which
word a token belongs to), so the ids equal the tokenizer's encoding of the text, e.g. GPT-2's
``Ġword`` pieces after a space. Slow (Python) tokenizers, which have no offsets, are encoded
word by word with a leading space before every word but the first.

Importing this module imports neither ``torch`` nor ``transformers``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from jaxtyping import Int
    from torch import Tensor

MODEL_KINDS = ("causal", "encoder")
#: Token added when a tokenizer lacks one to read out at (only with ``add_missing=True``).
ADDED_READOUT_TOKEN = "<|readout|>"


@dataclass
class EncodedText:
    """One encoded stimulus: ids (specials included) and each word's ``[start, end)`` span."""

    text: str
    ids: list[int]
    words: list[str]
    spans: list[tuple[int, int]]

    @property
    def readout_position(self) -> int:
        """Index of the readout token (the last one)."""
        return len(self.ids) - 1


@dataclass
class PairAlignment:
    """Result of aligning a minimal pair.

    ``ok`` pairs have equal token counts; ``word_groups[i]`` lists the token positions of word
    ``i`` (identical in both stimuli), ``differing_words`` the indices of words that differ, and
    ``special_positions`` the positions of BOS/CLS and the readout token. Otherwise ``reason``
    says why the pair cannot be aligned (e.g. a differing word has a different number of tokens).
    """

    ok: bool
    reason: str = ""
    a: EncodedText | None = None
    b: EncodedText | None = None
    word_groups: list[list[int]] = field(default_factory=list)
    differing_words: list[int] = field(default_factory=list)
    special_positions: list[int] = field(default_factory=list)

    @property
    def differing_positions(self) -> list[int]:
        """Token positions of the words that differ between the two stimuli (empty if not ok)."""
        if not self.ok:
            return []
        return [p for w in self.differing_words for p in self.word_groups[w]]


def _offline_load(directory: Path) -> Any:
    """``AutoTokenizer.from_pretrained(directory)`` with local files only (no network)."""
    from subroutine_circuits.models.hf import _offline_env, has_tokenizer

    if not directory.is_dir():
        raise ValueError(f"tokenizer folder {str(directory)!r} is not a directory")
    if not has_tokenizer(directory):
        raise ValueError(
            f"no tokenizer files in {str(directory)!r} (expected tokenizer.json, vocab.txt, "
            "vocab.json, tokenizer.model or spiece.model written by save_pretrained)"
        )
    from transformers import AutoTokenizer

    try:
        with _offline_env():
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"tokenizer in {str(directory)!r} could not be loaded: {err}") from err


class HFTaskTokenizer:
    """Task-facing wrapper of a Hugging Face tokenizer.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast ones give exact word offsets).
        kind: ``"causal"`` (BOS if any, text, end-of-text) or ``"encoder"`` (``[CLS]``, text,
            ``[SEP]``).
        add_missing: if the tokenizer has no readout token (no EOS for causal, no SEP for
            encoders), add :data:`ADDED_READOUT_TOKEN` as a special token instead of raising. The
            vocabulary then grows by one: the model's embeddings must be resized
            (``added_tokens`` says so).
        source: the folder the tokenizer came from (kept for :meth:`to_dict`).
    """

    def __init__(
        self,
        tokenizer: Any,
        kind: str = "causal",
        add_missing: bool = False,
        source: str | None = None,
    ) -> None:
        if kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")
        if tokenizer is None or not hasattr(tokenizer, "convert_tokens_to_ids"):
            raise ValueError(f"expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.kind = kind
        self.source = source
        self.added_tokens: list[str] = []
        if kind == "causal":
            self.prefix_id = tokenizer.bos_token_id
            readout = tokenizer.eos_token_id
            readout_name = "end-of-text (eos_token)"
        else:
            self.prefix_id = tokenizer.cls_token_id
            readout = tokenizer.sep_token_id
            readout_name = "[SEP] (sep_token)"
        if readout is None:
            if not add_missing:
                raise ValueError(
                    f"the tokenizer has no {readout_name} to read out at; pass add_missing=True "
                    f"to add {ADDED_READOUT_TOKEN!r} (the model's embeddings must then be resized)"
                )
            tokenizer.add_special_tokens({"additional_special_tokens": [ADDED_READOUT_TOKEN]})
            readout = tokenizer.convert_tokens_to_ids(ADDED_READOUT_TOKEN)
            self.added_tokens.append(ADDED_READOUT_TOKEN)
        self.readout_id = int(readout)
        pad = tokenizer.pad_token_id
        # padded keys are masked everywhere, so any id works; prefer the tokenizer's own
        self.pad_id = int(pad if pad is not None else self.readout_id)
        self._fast = bool(getattr(tokenizer, "is_fast", False))

    # ----- construction ------------------------------------------------------------------------
    @classmethod
    def from_folder(
        cls, path: str | os.PathLike, kind: str | None = None, add_missing: bool = False
    ) -> HFTaskTokenizer:
        """Load the tokenizer saved in a model folder (offline).

        ``kind=None`` reads ``config.json``: encoder for BERT-like models (``is_decoder`` false
        and a model type in ``bert``/``roberta``/``distilbert``/``electra``/``albert``), else
        causal.
        """
        directory = Path(path)
        tok = _offline_load(directory)
        if kind is None:
            kind = guess_model_kind(directory)
        return cls(tok, kind=kind, add_missing=add_missing, source=str(directory))

    # ----- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.tokenizer)

    def __len__(self) -> int:
        return self.vocab_size

    def token_id(self, token_text: str) -> int:
        """The id of a word that is exactly one token (as it appears after a space).

        Raises ``ValueError`` if the word is split into several tokens (label words such as
        ``yes``/``no`` must be single tokens).
        """
        ids = self._word_ids(token_text, first=False)
        if len(ids) != 1:
            raise ValueError(
                f"{token_text!r} is {len(ids)} tokens for this tokenizer, expected exactly one"
            )
        return ids[0]

    def _word_ids(self, word: str, first: bool) -> list[int]:
        """Ids of one word encoded alone (leading space unless it is the first word)."""
        text = word if first else " " + word
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ----- encoding ----------------------------------------------------------------------------
    def encode_words(self, text: str) -> EncodedText:
        """Encode ``text`` with its special tokens and the token span of every word."""
        if not isinstance(text, str):
            raise ValueError(f"expected a text, got {type(text).__name__}")
        words = text.split()
        if not words:
            raise ValueError("cannot encode an empty text")
        norm = " ".join(words)
        body, spans = self._encode_body(norm, words)
        ids = []
        if self.prefix_id is not None:
            ids.append(int(self.prefix_id))
        shift = len(ids)
        ids.extend(body)
        ids.append(self.readout_id)
        return EncodedText(norm, ids, words, [(s + shift, e + shift) for s, e in spans])

    def _encode_body(self, text: str, words: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` without specials, and each word's span in them."""
        if not self._fast:
            ids: list[int] = []
            spans = []
            for i, w in enumerate(words):
                piece = self._word_ids(w, first=i == 0)
                if not piece:
                    raise ValueError(f"word {w!r} encodes to no tokens")
                spans.append((len(ids), len(ids) + len(piece)))
                ids.extend(piece)
            return ids, spans
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        # character range of each word in the single-spaced text
        starts, pos = [], 0
        for w in words:
            starts.append(pos)
            pos += len(w) + 1
        ends = [s + len(w) for s, w in zip(starts, words)]
        owner = []
        for tok_start, tok_end in offsets:
            # the word holding the token's last character; a token that is only the space
            # before a word (GPT-2's bare "Ġ") belongs to the following word, like "Ġword"
            c = max(tok_end - 1, tok_start)
            w = next((i for i, (s, e) in enumerate(zip(starts, ends)) if s <= c < e), None)
            if w is None:
                w = next((i for i, s in enumerate(starts) if c < s), len(words) - 1)
            owner.append(w)
        spans = []
        for i, w in enumerate(words):
            idx = [t for t, o in enumerate(owner) if o == i]
            if not idx:
                raise ValueError(f"word {w!r} of {text!r} got no tokens")
            if idx != list(range(idx[0], idx[-1] + 1)):
                raise ValueError(f"tokens of word {w!r} in {text!r} are not contiguous")
            spans.append((idx[0], idx[-1] + 1))
        return ids, spans

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``: prefix (BOS / [CLS]) if any, the words, the readout token."""
        return self.encode_words(text).ids

    def word_spans(self, text: str) -> list[tuple[int, int]]:
        """``[start, end)`` token positions of each whitespace-separated word of ``text``."""
        return self.encode_words(text).spans

    def encode_batch(
        self, texts: Sequence[str], max_len: int | None = None
    ) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n"]]:
        """Encode and right-pad: ``(tokens [n, pos] long, lengths [n] long)``.

        The readout token is at ``lengths - 1``. A text longer than ``max_len`` raises.
        """
        from subroutine_circuits.tasks.tokenizer import pad_batch

        if isinstance(texts, str):
            raise ValueError("encode_batch expects a list of texts, got a single string")
        encoded = [self.encode(t) for t in texts]
        return pad_batch(encoded, self.pad_id, max_len)

    # ----- minimal pairs -----------------------------------------------------------------------
    def align_pair(self, a_text: str, b_text: str) -> PairAlignment:
        """Align two stimuli of a minimal pair at word boundaries.

        The pair aligns when both texts have the same number of words and every word has the
        same number of tokens in both; token ``t`` of one then corresponds to token ``t`` of the
        other, and a word's tokens form one group (patched together). Otherwise the result has
        ``ok=False`` and a ``reason``; nothing is dropped silently.
        """
        a, b = self.encode_words(a_text), self.encode_words(b_text)
        if len(a.words) != len(b.words):
            return PairAlignment(
                False, f"different numbers of words ({len(a.words)} vs {len(b.words)})", a, b
            )
        differing = [i for i, (wa, wb) in enumerate(zip(a.words, b.words)) if wa != wb]
        for i, ((sa, ea), (sb, eb)) in enumerate(zip(a.spans, b.spans)):
            if ea - sa != eb - sb:
                which = "differing" if i in differing else "shared"
                return PairAlignment(
                    False,
                    f"{which} word {i} has {ea - sa} token(s) in {a.words[i]!r} but {eb - sb} "
                    f"in {b.words[i]!r}",
                    a,
                    b,
                    differing_words=differing,
                )
        if len(a.ids) != len(b.ids):  # pragma: no cover - implied by equal spans
            return PairAlignment(False, "different token counts", a, b)
        groups = [list(range(s, e)) for s, e in a.spans]
        in_words = {p for g in groups for p in g}
        specials = [p for p in range(len(a.ids)) if p not in in_words]
        return PairAlignment(True, "", a, b, groups, differing, specials)

    # ----- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"type": "hf", "path": folder, "kind": ..., "added_tokens": [...]}``."""
        if self.source is None:
            raise ValueError("this tokenizer was not loaded from a folder; save it first")
        return {
            "type": "hf",
            "path": self.source,
            "kind": self.kind,
            "added_tokens": list(self.added_tokens),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFTaskTokenizer:
        """Inverse of :meth:`to_dict` (reloads from the folder)."""
        if d.get("type") != "hf" or "path" not in d:
            raise ValueError(f"not an HF tokenizer description: {d!r}")
        return cls.from_folder(
            d["path"], kind=d.get("kind"), add_missing=bool(d.get("added_tokens"))
        )

    def __repr__(self) -> str:
        return (
            f"HFTaskTokenizer({type(self.tokenizer).__name__}, kind={self.kind!r}, "
            f"vocab_size={self.vocab_size})"
        )


_ENCODER_TYPES = ("bert", "roberta", "distilbert", "electra", "albert", "xlm-roberta", "deberta")


def guess_model_kind(directory: str | os.PathLike) -> str:
    """``"encoder"`` for BERT-like checkpoints (by ``config.json`` ``model_type``), else causal."""
    import json

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json in {str(directory)!r}: pass kind='causal' or 'encoder'")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"config.json in {str(directory)!r} is not valid JSON: {err}") from err
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in _ENCODER_TYPES and not cfg.get("is_decoder", False):
        return "encoder"
    return "causal"
