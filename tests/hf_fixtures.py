"""Tiny Hugging Face checkpoints with their own tokenizers, built locally (nothing downloaded).

The builders live in the package (:mod:`subroutine_circuits.models.hf_build`, also used by
``scripts/make_hf_shape_checkpoints.py``) and are re-exported here for the tests:

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

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from subroutine_circuits.models.hf_build import (  # noqa: F401  (re-exported for the tests)
    BERT_SPECIALS,
    EOT,
    save_bert_folder,
    save_folder,
    save_gpt2_folder,
    task_texts,
    train_bpe_tokenizer,
    train_wordpiece_tokenizer,
)

#: the pytest fixtures, for ``from tests.hf_fixtures import *`` in test modules
__all__ = [
    "hf_texts",
    "bpe_tokenizer",
    "wordpiece_tokenizer",
    "gpt2_folder",
    "bert_folder",
]


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
    return save_folder(path, model, tokenizer)


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
