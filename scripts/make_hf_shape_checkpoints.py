#!/usr/bin/env python
"""Write random-weight Hugging Face checkpoint folders shaped like GPT-2 small and BERT small.

    python scripts/make_hf_shape_checkpoints.py --out checkpoints

writes ``checkpoints/gpt2_small_shape`` (``GPT2LMHeadModel``: 12 layers, d_model 768, 12 heads,
d_mlp 3072) and ``checkpoints/bert_small_shape`` (``BertForMaskedLM``: 4 layers, d_model 512, 8
heads, d_mlp 2048; ``--shapes minilm_shape`` adds ``checkpoints/minilm_shape``, a 6-layer, d_model
384, 12-head, d_mlp 1536 encoder of 22.7M parameters), each with its own tokenizer trained here on
sentences of the built-in ``agreement_singular`` task (a GPT-2-style byte-level BPE with
``<|endoftext|>``, a BERT-style WordPiece with ``[CLS]``/``[SEP]``). Nothing is downloaded. The
vocabularies are small (900 / 600 ids for the task's 392 words: about 100 words are split into
pieces, consistently across minimal pairs, so every pair aligns), so the embedding matrices are
smaller than the real models'; every block has the real shape. ``configs/hf_gpt2_small_shape.toml``
and ``configs/hf_bert_small_shape.toml`` point at these folders (relative to the configs folder:
``../checkpoints/...``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from subroutine_circuits.models.hf_build import (
    save_bert_folder,
    save_gpt2_folder,
    task_texts,
    train_bpe_tokenizer,
    train_wordpiece_tokenizer,
)


def gpt2_small_shape(out: Path, texts: list[str], seed: int) -> Path:
    """GPT-2 small blocks (12 x 768, 12 heads, MLP 3072) with random weights."""
    tok = train_bpe_tokenizer(texts, vocab_size=900)
    return save_gpt2_folder(
        out / "gpt2_small_shape", tok, seed, n_layer=12, n_embd=768, n_head=12, n_inner=3072,
        n_positions=1024,
    )  # fmt: skip


def bert_small_shape(out: Path, texts: list[str], seed: int) -> Path:
    """BERT small blocks (4 x 512, 8 heads, MLP 2048) with random weights."""
    tok = train_wordpiece_tokenizer(texts, vocab_size=600)
    return save_bert_folder(
        out / "bert_small_shape", tok, seed + 1, n_layer=4, hidden=512, n_head=8,
        intermediate=2048, max_positions=512,
    )  # fmt: skip


def minilm_shape(out: Path, texts: list[str], seed: int) -> Path:
    """A 6-layer sentence-encoder shape (6 x 384, 12 heads, MLP 1536; 30,522 embedding rows as
    BERT's vocabulary, so about 22.7M parameters like the real pretrained encoders of this size)."""
    tok = train_wordpiece_tokenizer(texts, vocab_size=600)
    return save_bert_folder(
        out / "minilm_shape", tok, seed + 2, n_layer=6, hidden=384, n_head=12,
        intermediate=1536, max_positions=512, vocab_size=30522,
    )  # fmt: skip


SHAPES = {"gpt2_small_shape": gpt2_small_shape, "bert_small_shape": bert_small_shape,
          "minilm_shape": minilm_shape}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="checkpoints", help="parent folder of the checkpoints")
    parser.add_argument("--seed", type=int, default=12345, help="weight seed")
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(SHAPES),
        default=["gpt2_small_shape", "bert_small_shape"],
        help="which folders to write (default: the GPT-2- and BERT-small-shaped ones)",
    )  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    texts = task_texts(n=3000)
    for path in (SHAPES[name](out, texts, args.seed) for name in args.shapes):
        n = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} ({n:.0f} MiB)")


if __name__ == "__main__":
    main()
