"""HFTaskTokenizer: encodings equal the tokenizer's own, word spans, readout token, pair alignment.

Tokenizers are trained locally on the agreement task (``tests/hf_fixtures.py``); nothing is
downloaded.
"""

from __future__ import annotations

import random

import pytest
import torch

from subroutine_circuits.tasks.hf_tokenizer import (
    ADDED_READOUT_TOKEN,
    HFTaskTokenizer,
    guess_model_kind,
)
from tests.hf_fixtures import *  # noqa: F403  (pytest fixtures: gpt2_folder, bert_folder, ...)
from tests.hf_fixtures import EOT


def _pairs(n: int = 60, seed: int = 3) -> list[tuple[str, str]]:
    from subroutine_circuits.tasks import get_task

    task = get_task("agreement_singular")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pred = task.predicates[i % 2]
        values = {p: rng.random() < 0.5 for p in task.predicates}
        a, b = task.minimal_pair(values, pred, rng)
        out.append((a.text, b.text))
    return out


def _clean(piece: str) -> str:
    return piece.replace("Ġ", "").replace("##", "")


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_folder):
    return HFTaskTokenizer.from_folder(gpt2_folder)


@pytest.fixture(scope="module")
def bert_tok(bert_folder):
    return HFTaskTokenizer.from_folder(bert_folder)


def test_kind_is_read_from_config(gpt2_folder, bert_folder, gpt2_tok, bert_tok):
    assert guess_model_kind(gpt2_folder) == "causal" and gpt2_tok.kind == "causal"
    assert guess_model_kind(bert_folder) == "encoder" and bert_tok.kind == "encoder"


def test_encoding_equals_the_tokenizers_own(gpt2_tok, bert_tok, hf_texts):
    eot = gpt2_tok.tokenizer.convert_tokens_to_ids(EOT)
    for text in hf_texts[:80]:
        body = gpt2_tok.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert gpt2_tok.encode(text) == [eot, *body, eot]
        # BERT's own post-processor adds [CLS] ... [SEP]: exactly our prefix and readout token
        assert bert_tok.encode(text) == bert_tok.tokenizer(text)["input_ids"]


def test_word_spans_cover_each_word(gpt2_tok, bert_tok, hf_texts):
    split_words = 0
    for tok in (gpt2_tok, bert_tok):
        for text in hf_texts[:80]:
            enc = tok.encode_words(text)
            assert len(enc.spans) == len(text.split())
            # spans tile the text between the prefix and the readout token
            assert enc.spans[0][0] == 1 and enc.spans[-1][1] == len(enc.ids) - 1
            for (s, e), (s2, _) in zip(enc.spans, enc.spans[1:]):
                assert e == s2 and e > s
            for word, (s, e) in zip(enc.words, enc.spans):
                pieces = tok.tokenizer.convert_ids_to_tokens(enc.ids[s:e])
                assert "".join(_clean(p) for p in pieces) == word
                split_words += e - s > 1
            assert tok.word_spans(text) == enc.spans
    assert split_words > 50, "the fixture tokenizers should split many task words"


def test_encode_batch_pads_right_with_readout_last(gpt2_tok, bert_tok, hf_texts):
    texts = hf_texts[:7]
    for tok in (gpt2_tok, bert_tok):
        tokens, lengths = tok.encode_batch(texts)
        assert tokens.dtype == torch.long and tokens.shape == (7, int(lengths.max()))
        for i, t in enumerate(texts):
            ids = tok.encode(t)
            assert lengths[i] == len(ids)
            assert tokens[i, : len(ids)].tolist() == ids
            assert (tokens[i, len(ids) :] == tok.pad_id).all()
            assert tokens[i, lengths[i] - 1] == tok.readout_id
        with pytest.raises(ValueError, match="max_len"):
            tok.encode_batch(texts, max_len=3)
        with pytest.raises(ValueError, match="single string"):
            tok.encode_batch("the dog runs")
    assert bert_tok.readout_id == bert_tok.tokenizer.sep_token_id
    assert gpt2_tok.readout_id == gpt2_tok.tokenizer.convert_tokens_to_ids(EOT)


def test_align_pair_groups_and_reasons(gpt2_tok, bert_tok):
    for tok in (gpt2_tok, bert_tok):
        n_ok = n_bad = 0
        for a_text, b_text in _pairs():
            al = tok.align_pair(a_text, b_text)
            a, b = tok.encode_words(a_text), tok.encode_words(b_text)
            counts_equal = [ea - sa == eb - sb for (sa, ea), (sb, eb) in zip(a.spans, b.spans)]
            if al.ok:
                n_ok += 1
                assert all(counts_equal) and len(a.ids) == len(b.ids)
                assert al.word_groups == [list(range(s, e)) for s, e in a.spans]
                assert al.special_positions == [0, len(a.ids) - 1]
                # outside the differing words the two stimuli are identical token by token
                diff = set(al.differing_positions)
                assert diff, "a minimal pair differs somewhere"
                for p in range(len(a.ids)):
                    if p not in diff:
                        assert a.ids[p] == b.ids[p]
            else:
                n_bad += 1
                assert not all(counts_equal) and "token" in al.reason
                assert al.differing_positions == []
        assert n_ok > 0 and n_bad > 0, (n_ok, n_bad)  # both cases occur with subword pieces


def test_align_pair_word_count_mismatch(gpt2_tok):
    al = gpt2_tok.align_pair("the dog runs", "the big dog runs")
    assert not al.ok and "numbers of words" in al.reason


def test_word_by_word_path_matches_offsets(gpt2_tok, bert_tok, hf_texts):
    """The fallback for tokenizers without offsets (slow ones) gives the same ids and spans."""
    for tok in (gpt2_tok, bert_tok):
        slow = HFTaskTokenizer(tok.tokenizer, kind=tok.kind)
        slow._fast = False  # force the word-by-word path on the same tokenizer
        for text in hf_texts[:40]:
            assert slow.encode_words(text).ids == tok.encode_words(text).ids
            assert slow.word_spans(text) == tok.word_spans(text)


def test_missing_readout_token(bpe_tokenizer):
    import copy

    tok = copy.deepcopy(bpe_tokenizer)
    tok.eos_token = None
    with pytest.raises(ValueError, match="add_missing"):
        HFTaskTokenizer(tok, kind="causal")
    n = len(tok)
    wrapped = HFTaskTokenizer(tok, kind="causal", add_missing=True)
    assert wrapped.added_tokens == [ADDED_READOUT_TOKEN] and wrapped.vocab_size == n + 1
    assert wrapped.encode("the dog")[-1] == wrapped.readout_id == n


def test_token_id_and_bad_input(gpt2_tok, bert_tok, tmp_path):
    the = gpt2_tok.token_id("the")
    assert gpt2_tok.tokenizer.convert_ids_to_tokens(the) == "Ġthe"
    with pytest.raises(ValueError, match="exactly one"):
        bert_tok.token_id("grandmothers")
    with pytest.raises(ValueError, match="empty"):
        gpt2_tok.encode("   ")
    with pytest.raises(ValueError, match="model kind"):
        HFTaskTokenizer(gpt2_tok.tokenizer, kind="seq2seq")
    with pytest.raises(ValueError, match="no tokenizer files"):
        HFTaskTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        HFTaskTokenizer.from_folder(tmp_path / "missing")


def test_to_dict_round_trip(gpt2_tok):
    again = HFTaskTokenizer.from_dict(gpt2_tok.to_dict())
    assert again.kind == gpt2_tok.kind and again.encode("the dog") == gpt2_tok.encode("the dog")
