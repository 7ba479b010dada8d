"""Tiny Hugging Face checkpoints with their own tokenizers, built locally (nothing downloaded).

Builders (plain functions, usable from benchmarks too) and pytest fixtures:

- :func:`task_texts`: sentences of the built-in ``agreement_singular`` task, minimal pairs
  included, used as the tokenizer training corpus;
- :func:`train_bpe_tokenizer`: a GPT-2-style byte-level BPE (``<|endoftext|>`` as BOS/EOS)
  trained with the ``tokenizers`` library; with a small vocabulary, many task words are split
  into several pieces (``horses`` -> ``Ġhors`` ``es``), which exercises word alignment;
- :func:`train_wordpiece_tokenizer`: a BERT-style WordPiece tokenizer (``[CLS] ... [SEP]``);
- :func:`save_gpt2_folder` / :func:`save_bert_folder`: a randomly initialised
  ``GPT2LMHeadModel`` / ``BertForMaskedLM`` and its tokenizer written with ``save_pretrained``.

Fixtures ``gpt2_folder`` and ``bert_folder`` are session-scoped (built once per run).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

#: the pytest fixtures, for ``from tests.hf_fixtures import *`` in test modules
__all__ = [
    "hf_texts",
    "bpe_tokenizer",
    "wordpiece_tokenizer",
    "gpt2_folder",
    "bert_folder",
]

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def task_texts(n: int = 400, seed: int = 0) -> list[str]:
    """``n`` sentences of ``agreement_singular`` plus both sides of ``n // 4`` minimal pairs."""
    from subroutine_circuits.tasks import get_task

    task = get_task("agreement_singular")
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        values = {p: rng.random() < 0.5 for p in task.predicates}
        texts.append(task.sample(values, rng).text)
    for i in range(n // 4):
        pred = task.predicates[i % len(task.predicates)]
        values = {p: rng.random() < 0.5 for p in task.predicates}
        a, b = task.minimal_pair(values, pred, rng)
        texts.extend([a.text, b.text])
    texts.append(" ".join(sorted(task.vocabulary())))  # every word at least once
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 330) -> Any:
    """GPT-2-style byte-level BPE fast tokenizer trained on ``texts``.

    ``vocab_size`` 330 leaves about 70 merges above the 256 bytes: frequent words become one
    token, rarer ones (and most plurals) several.
    """
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


def _quiet_save(obj: Any, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj.save_pretrained(str(path))


def save_gpt2_folder(
    path: Path, tokenizer: Any, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 4
) -> Path:
    """Save a random ``GPT2LMHeadModel`` sized for ``tokenizer`` plus the tokenizer to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_inner=2 * n_embd,
        vocab_size=len(tokenizer),
        n_positions=64,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    _quiet_save(model, path)
    _quiet_save(tokenizer, path)
    return path


def save_bert_folder(
    path: Path, tokenizer: Any, seed: int = 0, n_layer: int = 2, hidden: int = 32, n_head: int = 4
) -> Path:
    """Save a random ``BertForMaskedLM`` sized for ``tokenizer`` plus the tokenizer to ``path``."""
    from transformers import BertConfig, BertForMaskedLM

    path.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig(
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        num_attention_heads=n_head,
        intermediate_size=2 * hidden,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(cfg)
    _quiet_save(model, path)
    _quiet_save(tokenizer, path)
    return path


def save_decoder_folder(path: Path, tokenizer: Any, family: str, seed: int = 0) -> Path:
    """Save a tiny random Llama-style (``family="llama"``, grouped-query attention, gated MLP)
    or Pythia-style (``"gpt_neox"``) causal model plus ``tokenizer`` to ``path``."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common, num_key_value_heads=2), "LlamaForCausalLM"
    elif family == "gpt_neox":
        cfg, cls = transformers.GPTNeoXConfig(**common), "GPTNeoXForCausalLM"
    else:
        raise ValueError(f"unknown family {family!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls)(cfg)
    _quiet_save(model, path)
    _quiet_save(tokenizer, path)
    return path


def load_hf_reference(path: Path) -> Any:
    """The Hugging Face model saved in ``path`` (eager attention, eval mode), for comparisons."""
    import json

    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch).from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager"
        )
    return model.eval()


@pytest.fixture(scope="session")
def hf_texts() -> list[str]:
    """Tokenizer training corpus from the agreement task."""
    return task_texts()


@pytest.fixture(scope="session")
def bpe_tokenizer(hf_texts):
    """Byte-level BPE that splits many task words into pieces."""
    return train_bpe_tokenizer(hf_texts)


@pytest.fixture(scope="session")
def wordpiece_tokenizer(hf_texts):
    """BERT-style WordPiece tokenizer."""
    return train_wordpiece_tokenizer(hf_texts)


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory, bpe_tokenizer) -> Path:
    """A folder with a tiny random GPT-2 and its BPE tokenizer."""
    return save_gpt2_folder(tmp_path_factory.mktemp("hf") / "gpt2", bpe_tokenizer)


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory, wordpiece_tokenizer) -> Path:
    """A folder with a tiny random BERT (masked LM) and its WordPiece tokenizer."""
    return save_bert_folder(tmp_path_factory.mktemp("hf") / "bert", wordpiece_tokenizer)
