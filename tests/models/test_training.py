"""Fast tests for models.train and models.pretrain (errors, restoring best weights, losses)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from subroutine_circuits.models import (
    ModelSpec,
    PretrainConfig,
    TrainConfig,
    final_hidden,
    lm_loss,
    make_model,
    ooo_accuracy,
    pretrain,
    train_ooo,
)
from subroutine_circuits.models.pretraining import mlm_corrupt
from subroutine_circuits.tasks import get_task, make_splits
from tests.tl_versions import tl3_only


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these small-tensor tests on one intra-op thread, restoring the setting afterwards.

    On a shared 2-core machine, two OpenMP threads per process that wait for each other make
    tiny-model training many times slower (measured: 75 steps took 205 s with 2 threads under
    load, 12 s with 1); with one thread the time measured is the work itself.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def agreement():
    """The real agreement task, its tokenizer and small composite splits."""
    task = get_task("agreement_singular")
    splits = make_splits(task, {"composite": 40}, seed=0)
    return task, task.tokenizer(), splits


def _tiny(tok, attention="causal", seed=0):
    return make_model(
        ModelSpec("tiny", attention=attention, n_ctx=32, d_model=32, d_mlp=64), tok.vocab_size, seed
    )


def _init_encoder(enc) -> None:
    """HookedEncoder leaves weights uninitialised (it expects from_pretrained): init them."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.split(".")[-1] == "w":
                p.fill_(1.0)
            else:
                p.zero_()


def test_train_errors(agreement):
    _, tok, splits = agreement
    model = _tiny(tok)
    train, val = splits["train"]["composite"], splits["val"]["composite"]
    with pytest.raises(ValueError, match="empty train split"):
        train_ooo(model, [], val, tok, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="empty validation split"):
        train_ooo(model, train, [], tok, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="batch_size"):
        train_ooo(model, train, val, tok, TrainConfig(batch_size=0, progress=False))
    with torch.no_grad():
        model.W_E[:] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_ooo(model, train, val, tok, TrainConfig(progress=False))


def test_train_restores_best_weights_and_is_seeded(agreement):
    _, tok, splits = agreement
    train, val = splits["train"]["composite"], splits["val"]["composite"]
    cfg = TrainConfig(max_steps=12, eval_every=3, batch_size=8, patience=100, progress=False)
    m1, m2 = _tiny(tok), _tiny(tok)
    r1 = train_ooo(m1, train, val, tok, cfg)
    r2 = train_ooo(m2, train, val, tok, cfg)
    assert r1.steps == 12 or r1.stop_reason == "target_val_acc"
    assert [h["step"] for h in r1.history][:2] == [0, 3]
    # best validation accuracy in the history, and the model holds those weights
    assert r1.best_val_acc == max(h["val_acc"] for h in r1.history)
    best = next(h for h in r1.history if h["val_acc"] == r1.best_val_acc)
    assert best["step"] == r1.best_step
    assert ooo_accuracy(m1, val, tok) == pytest.approx(r1.best_val_acc)
    # same seed, same model: identical weights and history
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert [h["val_acc"] for h in r1.history] == [h["val_acc"] for h in r2.history]
    # training actually changed the weights (unless the initial model was already best)
    if r1.best_step > 0:
        fresh = _tiny(tok)
        assert not torch.equal(fresh.W_E, m1.W_E)


def test_train_patience_stops(agreement):
    _, tok, splits = agreement
    model = _tiny(tok)
    cfg = TrainConfig(lr=1e-9, max_steps=200, eval_every=2, patience=2, batch_size=8)
    cfg.progress = False
    r = train_ooo(model, splits["train"]["composite"], splits["val"]["composite"], tok, cfg)
    # at lr 1e-9 the accuracy cannot improve: stop after exactly `patience` evaluations
    assert r.stop_reason == "patience" and r.steps == 4 and r.best_step == 0


def test_clm_loss_matches_manual(agreement):
    task, tok, _ = agreement
    model = _tiny(tok)
    texts = task.corpus(6, random.Random(3))
    got = lm_loss(model, texts, tok)
    total, count = 0.0, 0
    for t in texts:  # independent: one sentence at a time, no padding
        ids = torch.tensor([tok.encode(t)])
        with torch.no_grad():
            logits = model(ids)[0]
        total += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert got == pytest.approx(total / count, rel=1e-5)
    assert 0.5 * math.log(tok.vocab_size) < got < 2 * math.log(tok.vocab_size)


def test_mlm_corrupt_statistics():
    g = torch.Generator().manual_seed(0)
    n, pos = 400, 12
    lengths = torch.randint(2, pos + 1, (n,), generator=g)
    tokens = torch.randint(5, 50, (n, pos), generator=g)
    tokens[:, 0] = 1
    tokens[torch.arange(pos)[None, :] >= lengths[:, None]] = 0
    out, chosen = mlm_corrupt(
        tokens, lengths, mask_id=3, vocab_size=50, mask_prob=0.15, generator=g
    )
    cand = (torch.arange(pos)[None, :] >= 1) & (torch.arange(pos)[None, :] < lengths[:, None])
    assert not (chosen & ~cand).any(), "only real non-BOS tokens may be chosen"
    assert chosen.any(1).all(), "every sequence gets at least one target"
    assert torch.equal(out[~chosen], tokens[~chosen])
    frac_chosen = chosen.sum() / cand.sum()
    assert 0.15 <= frac_chosen < 0.25  # 15% plus the forced ones in short sequences
    frac_mask = float((out[chosen] == 3).float().mean())
    assert 0.72 < frac_mask < 0.88


@pytest.mark.parametrize("attention, objective", [("causal", "clm"), ("bidirectional", "mlm")])
def test_pretraining_lowers_heldout_loss(agreement, attention, objective):
    task, tok, splits = agreement
    corpus = task.corpus(800, random.Random(0))
    held = task.corpus(100, random.Random(1))
    model = _tiny(tok, attention)
    before = lm_loss(model, held, tok, seed=5)
    out = pretrain(model, corpus, tok, PretrainConfig(steps=60, batch_size=32, progress=False))
    after = lm_loss(model, held, tok, seed=5)
    assert out["objective"] == objective and out["steps"] == 60 and len(out["losses"]) == 60
    assert before > 5.0  # near log(vocab) for a random model
    assert after < before - 1.0, (before, after)
    assert sum(out["losses"][-5:]) / 5 < sum(out["losses"][:5]) / 5 - 1.0
    # the readout still works on the pretrained model
    t, n = tok.encode_batch(held[:3])
    assert torch.isfinite(final_hidden(model, t, n)).all()


def test_pretrain_errors(agreement):
    _, tok, _ = agreement
    model = _tiny(tok)
    with pytest.raises(ValueError, match="empty corpus"):
        pretrain(model, [], tok, PretrainConfig(progress=False))
    with pytest.raises(ValueError, match="objective"):
        pretrain(model, ["the dog runs"], tok, PretrainConfig(objective="xyz", progress=False))
    bi = _tiny(tok, "bidirectional")
    with pytest.raises(ValueError, match="causal"):
        pretrain(bi, ["the dog runs"], tok, PretrainConfig(objective="clm", progress=False))


def test_train_label_restores_best_and_accuracy_matches_manual(agreement):
    from subroutine_circuits.models import label_accuracy, train_label
    from subroutine_circuits.tasks import make_label_examples

    task, tok, _ = agreement
    train = make_label_examples(task, 64, seed=0, split="train")
    val = make_label_examples(task, 24, seed=0, split="val")
    model = _tiny(tok)
    cfg = TrainConfig(max_steps=16, eval_every=4, batch_size=16, patience=100, progress=False)
    r = train_label(model, train, val, tok, cfg)
    assert r.best_val_acc == max(h["val_acc"] for h in r.history)
    acc = label_accuracy(model, val, tok)
    assert acc == pytest.approx(r.best_val_acc)
    # independent: one example at a time, logits of the full forward pass at the last token
    correct = 0
    for e in val:
        ids = torch.tensor([tok.encode(e.text)])
        with torch.no_grad():
            last = model(ids)[0, -1]
        correct += int(bool(last[tok.yes_id] > last[tok.no_id]) == e.label)
    assert acc == pytest.approx(correct / len(val))
    with pytest.raises(ValueError, match="empty train split"):
        train_label(model, [], val, tok, cfg)


@tl3_only
def test_pretrain_and_finetune_hooked_encoder(agreement):
    """HookedEncoder (BERT-style) models pretrain with the masked-token objective and train."""
    from transformer_lens import HookedEncoder, HookedTransformerConfig

    task, tok, splits = agreement
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=tok.vocab_size,
        n_ctx=32, act_fn="gelu", normalization_type="LN", attention_dir="bidirectional",
    )  # fmt: skip
    enc = HookedEncoder(cfg)
    _init_encoder(enc)
    held = task.corpus(50, random.Random(1))
    before = lm_loss(enc, held, tok, seed=2)
    out = pretrain(
        enc,
        task.corpus(300, random.Random(0)),
        tok,
        PretrainConfig(steps=30, batch_size=32, progress=False),
    )
    assert out["objective"] == "mlm"
    assert lm_loss(enc, held, tok, seed=2) < before - 0.5
    r = train_ooo(
        enc, splits["train"]["composite"], splits["val"]["composite"], tok,
        TrainConfig(max_steps=6, eval_every=3, batch_size=8, progress=False, pool="mean"),
    )  # fmt: skip
    assert r.steps == 6 or r.stop_reason == "target_val_acc"
    assert ooo_accuracy(enc, splits["val"]["composite"], tok, pool="mean") == pytest.approx(
        r.best_val_acc
    )
