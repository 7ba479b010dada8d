"""Build Hugging Face checkpoint folders with random weights and their own tokenizers, offline.

One implementation for the tests (tiny folders, ``tests/hf_fixtures.py``) and for
``scripts/make_hf_shape_checkpoints.py`` (GPT-2-small- and BERT-small-shaped folders for GPU
runs): a byte-level BPE (GPT-2 style) or WordPiece (BERT style) tokenizer trained with the
``tokenizers`` library on sentences of a built-in task, and a model built from a
``transformers`` config, saved together with ``save_pretrained``. Nothing is downloaded.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import torch

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def task_texts(n: int = 400, seed: int = 0, task: str = "agreement_singular") -> list[str]:
    """``n`` sentences of ``task`` plus both sides of ``n // 4`` minimal pairs, and one line with
    every word of its vocabulary (so that every word is seen by the tokenizer trainer)."""
    from subroutine_circuits.tasks import get_task

    t = get_task(task)
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        values = {p: rng.random() < 0.5 for p in t.predicates}
        texts.append(t.sample(values, rng).text)
    for i in range(n // 4):
        pred = t.predicates[i % len(t.predicates)]
        values = {p: rng.random() < 0.5 for p in t.predicates}
        a, b = t.minimal_pair(values, pred, rng)
        texts.extend([a.text, b.text])
    texts.append(" ".join(sorted(t.vocabulary())))
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 330) -> Any:
    """GPT-2-style byte-level BPE fast tokenizer trained on ``texts`` (``<|endoftext|>`` is BOS,
    EOS and UNK). ``vocab_size`` 330 leaves about 70 merges above the 256 bytes: frequent words
    become one token, rarer ones (and most plurals) several."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOT, eos_token=EOT, unk_token=EOT
    )


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int = 160) -> Any:
    """BERT-style WordPiece fast tokenizer (lower-casing, ``[CLS] text [SEP]``)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def save_folder(path: Path, model: torch.nn.Module, tokenizer: Any) -> Path:
    """``save_pretrained`` ``model`` and ``tokenizer`` into ``path`` (created; warnings muted)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    return path


def _seeded(seed: int, build) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def save_gpt2_folder(
    path: Path,
    tokenizer: Any,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    n_inner: int | None = None,
    n_positions: int = 64,
) -> Path:
    """A random ``GPT2LMHeadModel`` sized for ``tokenizer`` (MLP ``2 * n_embd`` unless
    ``n_inner``), saved with the tokenizer to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eot = tokenizer.convert_tokens_to_ids(EOT)
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_inner=n_inner or 2 * n_embd,
        vocab_size=len(tokenizer), n_positions=n_positions, bos_token_id=eot, eos_token_id=eot,
    )  # fmt: skip
    return save_folder(path, _seeded(seed, lambda: GPT2LMHeadModel(cfg)), tokenizer)


def save_bert_folder(
    path: Path,
    tokenizer: Any,
    seed: int = 0,
    n_layer: int = 2,
    hidden: int = 32,
    n_head: int = 4,
    intermediate: int | None = None,
    max_positions: int = 64,
    vocab_size: int | None = None,
) -> Path:
    """A random ``BertForMaskedLM`` sized for ``tokenizer`` (MLP ``2 * hidden`` unless
    ``intermediate``; embedding rows ``vocab_size`` if given, at least the tokenizer's, so that
    a model's parameter count can match a real one whose vocabulary is larger), saved with the
    tokenizer to ``path``."""
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < the tokenizer's {len(tokenizer)} tokens")
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        num_hidden_layers=n_layer, hidden_size=hidden, num_attention_heads=n_head,
        intermediate_size=intermediate or 2 * hidden, vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return save_folder(path, _seeded(seed, lambda: BertForMaskedLM(cfg)), tokenizer)
