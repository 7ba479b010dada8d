"""A built-in word-level tokenizer (no downloads): whitespace-separated words -> ids.

Ids: ``[PAD]``=0, ``[BOS]``=1, ``[UNK]``=2, ``[MASK]``=3, ``[SEP]``=4, ``yes``=5, ``no``=6, then
the vocabulary words in the order given (duplicates and specials dropped).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily (only inside encode_batch)
    from jaxtyping import Int
    from torch import Tensor

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[BOS]", "[UNK]", "[MASK]", "[SEP]", "yes", "no")


def pad_batch(
    encoded: Sequence[Sequence[int]], pad_id: int, max_len: int | None = None
) -> tuple[Int[Tensor, "n pos"], Int[Tensor, " n"]]:
    """Right-pad token id lists with ``pad_id``: ``(tokens [n, pos], lengths [n])``, ``pos`` the
    longest (or ``max_len``; a longer list raises)."""
    import torch

    if not encoded:
        raise ValueError("encode_batch got an empty list of texts")
    longest = max(len(e) for e in encoded)
    if max_len is not None and longest > max_len:
        raise ValueError(f"a text has {longest} tokens, more than max_len={max_len}")
    width = longest if max_len is None else max_len
    tokens = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    for i, e in enumerate(encoded):
        tokens[i, : len(e)] = torch.tensor(e, dtype=torch.long)
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    return tokens, lengths


class WordTokenizer:
    """Word-level tokenizer: whitespace split, ``[BOS]`` first, unknown words -> ``[UNK]``.

    With ``eos=True`` (the default) every encoded text also ends with ``[SEP]``: a readout
    position that sees the words only through attention. Reading a sentence embedding at its last
    word instead lets that word's own embedding reach the readout through the residual stream,
    bypassing every maskable head and neuron (for agreement, the verb is the last word), so no
    unit mask could remove it; the ``[SEP]`` position closes that bypass.
    """

    def __init__(self, words: Iterable[str] = (), eos: bool = True) -> None:
        self.eos = bool(eos)
        self.itos: list[str] = list(SPECIAL_TOKENS)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        for w in words:
            if not isinstance(w, str) or not w or any(c.isspace() for c in w):
                raise ValueError(f"vocabulary entries must be non-empty words, got {w!r}")
            if w not in self.stoi:
                self.stoi[w] = len(self.itos)
                self.itos.append(w)

    @classmethod
    def from_texts(cls, texts: Iterable[str], eos: bool = True) -> WordTokenizer:
        """A tokenizer whose vocabulary is every word of ``texts`` (sorted for stability)."""
        words = set()
        for t in texts:
            words.update(t.split())
        return cls(sorted(words), eos=eos)

    # ----- ids ---------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        """Id of ``[PAD]`` (0)."""
        return self.stoi["[PAD]"]

    @property
    def bos_id(self) -> int:
        """Id of ``[BOS]``."""
        return self.stoi["[BOS]"]

    @property
    def unk_id(self) -> int:
        """Id of ``[UNK]``."""
        return self.stoi["[UNK]"]

    @property
    def mask_id(self) -> int:
        """Id of ``[MASK]``."""
        return self.stoi["[MASK]"]

    @property
    def sep_id(self) -> int:
        """Id of ``[SEP]``."""
        return self.stoi["[SEP]"]

    @property
    def yes_id(self) -> int:
        """Id of the label word ``yes``."""
        return self.stoi["yes"]

    @property
    def no_id(self) -> int:
        """Id of the label word ``no``."""
        return self.stoi["no"]

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials included)."""
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    # ----- encoding ----------------------------------------------------------------------------
    def token_to_id(self, word: str) -> int:
        """The id of one word (``[UNK]`` if unknown)."""
        return self.stoi.get(word, self.unk_id)

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` that are not in the vocabulary."""
        return [w for w in text.split() if w not in self.stoi]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool | None = None) -> list[int]:
        """Ids of the words of ``text``: ``[BOS]`` first, ``[SEP]`` last (if ``self.eos``)."""
        ids = [self.token_to_id(w) for w in text.split()]
        if add_bos:
            ids = [self.bos_id] + ids
        if self.eos if add_eos is None else add_eos:
            ids = ids + [self.stoi["[SEP]"]]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Words of ``ids`` joined by spaces (specials PAD, BOS, SEP dropped if skip_special)."""
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} out of range 0..{len(self.itos) - 1}")
            w = self.itos[i]
            if skip_special and w in ("[PAD]", "[BOS]", "[SEP]"):
                continue
            words.append(w)
        return " ".join(words)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = True, max_len: int | None = None
    ) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n"]]:
        """Encode and right-pad with ``[PAD]``.

        Returns ``(tokens, lengths)``: ``Int[Tensor, "n pos"]`` (LongTensor) and
        ``Int[Tensor, "n"]`` (number of real tokens per row, BOS and SEP included). A text longer
        than ``max_len`` raises ValueError.
        """
        if isinstance(texts, str):
            raise ValueError("encode_batch expects a list of texts, got a single string")
        encoded = [self.encode(t, add_bos=add_bos) for t in texts]
        return pad_batch(encoded, self.pad_id, max_len)

    # ----- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"type": "word", "vocab": [...], "eos": bool}`` (specials included, in id order)."""
        return {"type": "word", "vocab": list(self.itos), "eos": self.eos}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        """Inverse of :meth:`to_dict`; the special tokens must come first, in order."""
        vocab = d.get("vocab")
        if not isinstance(vocab, list):
            raise ValueError("tokenizer dict lacks a 'vocab' list")
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"tokenizer vocab must start with the special tokens {SPECIAL_TOKENS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("tokenizer vocab has duplicate entries")
        return cls(vocab[len(SPECIAL_TOKENS) :], eos=bool(d.get("eos", False)))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (atomically)."""
        from subroutine_circuits.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and (self.itos, self.eos) == (other.itos, other.eos)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"
