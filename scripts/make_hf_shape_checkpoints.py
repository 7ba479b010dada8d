#!/usr/bin/env python
"""Write random-weight Hugging Face checkpoint folders shaped like GPT-2 small and BERT small.

    python scripts/make_hf_shape_checkpoints.py --out checkpoints

writes ``checkpoints/gpt2_small_shape`` (``GPT2LMHeadModel``: 12 layers, d_model 768, 12 heads,
d_mlp 3072) and ``checkpoints/bert_small_shape`` (``BertForMaskedLM``: 4 layers, d_model 512,
8 heads, d_mlp 2048), each with its own tokenizer trained here on sentences of the built-in
``agreement_singular`` task (a GPT-2-style byte-level BPE with ``<|endoftext|>``, a BERT-style
WordPiece with ``[CLS]``/``[SEP]``). Nothing is downloaded. The vocabularies are small (900 /
600 ids for the task's 392 words: about 100 words are split into pieces, consistently across
minimal pairs, so every pair aligns), so the embedding matrices are smaller than the real
models'; every block has the real shape.
``configs/hf_gpt2_small_shape.toml`` and ``configs/hf_bert_small_shape.toml`` point at these
folders (relative to the configs folder: ``../checkpoints/...``).
"""

from __future__ import annotations

import argparse
import random
import warnings
from pathlib import Path

import torch

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Sentences of the agreement task (and both sides of minimal pairs), every word included."""
    from subroutine_circuits.tasks import get_task

    task = get_task("agreement_singular")
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        values = {p: rng.random() < 0.5 for p in task.predicates}
        texts.append(task.sample(values, rng).text)
        if i % 4 == 0:
            a, b = task.minimal_pair(values, task.predicates[i % len(task.predicates)], rng)
            texts.extend([a.text, b.text])
    texts.append(" ".join(sorted(task.vocabulary())))
    return texts


def bpe_tokenizer(texts: list[str], vocab_size: int) -> object:
    """A GPT-2-style byte-level BPE (``<|endoftext|>`` is BOS, EOS and UNK)."""
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


def wordpiece_tokenizer(texts: list[str], vocab_size: int) -> object:
    """A BERT-style WordPiece tokenizer (lower-casing, ``[CLS] text [SEP]``)."""
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


def save(model: torch.nn.Module, tokenizer: object, path: Path) -> Path:
    """``save_pretrained`` the model and its tokenizer into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    return path


def gpt2_small_shape(out: Path, texts: list[str], seed: int) -> Path:
    """GPT-2 small blocks (12 x 768, 12 heads, MLP 3072) with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bpe_tokenizer(texts, vocab_size=900)
    eot = tok.convert_tokens_to_ids(EOT)
    cfg = GPT2Config(
        n_layer=12, n_embd=768, n_head=12, n_inner=3072, n_positions=1024,
        vocab_size=len(tok), bos_token_id=eot, eos_token_id=eot,
    )  # fmt: skip
    torch.manual_seed(seed)
    return save(GPT2LMHeadModel(cfg), tok, out / "gpt2_small_shape")


def bert_small_shape(out: Path, texts: list[str], seed: int) -> Path:
    """BERT small blocks (4 x 512, 8 heads, MLP 2048) with random weights."""
    from transformers import BertConfig, BertForMaskedLM

    tok = wordpiece_tokenizer(texts, vocab_size=600)
    cfg = BertConfig(
        num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
        max_position_embeddings=512, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed + 1)
    return save(BertForMaskedLM(cfg), tok, out / "bert_small_shape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="checkpoints", help="parent folder of the checkpoints")
    parser.add_argument("--seed", type=int, default=12345, help="weight seed")
    args = parser.parse_args()
    out = Path(args.out)
    texts = corpus()
    for path in (gpt2_small_shape(out, texts, args.seed), bert_small_shape(out, texts, args.seed)):
        n = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} ({n:.0f} MiB)")


if __name__ == "__main__":
    main()
