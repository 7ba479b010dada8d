"""Tests for models/: presets, readouts (final_hidden, OOO, label token) and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from subroutine_circuits.models import (
    ModelSpec,
    encode_problems,
    final_hidden,
    label_logit_diff,
    label_logits,
    load_checkpoint,
    make_model,
    ooo_accuracy,
    ooo_logits_for_problems,
    ooo_scores,
    save_checkpoint,
)
from tests.tl_versions import tl3_only


def _padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    """Random right-padded tokens (pad id 0) with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    pos = max(lengths)
    tokens = torch.randint(1, vocab, (len(lengths), pos), generator=g)
    lens = torch.tensor(lengths)
    tokens[torch.arange(pos)[None, :] >= lens[:, None]] = 0
    return tokens, lens


@dataclass
class _Problem:
    stimuli: list[str]
    odd_index: int


class _StandInTokenizer:
    """Minimal word tokenizer with the WordTokenizer encode_batch contract (pad 0, BOS 1)."""

    def __init__(self, words: list[str]):
        self.vocab = {"[PAD]": 0, "[BOS]": 1}
        for w in words:
            self.vocab.setdefault(w, len(self.vocab))

    def encode_batch(self, texts):
        ids = [[1] + [self.vocab[w] for w in t.split()] for t in texts]
        pos = max(len(x) for x in ids)
        tokens = torch.zeros(len(ids), pos, dtype=torch.long)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.tensor(x)
        return tokens, torch.tensor([len(x) for x in ids])


# ---------------------------------------------------------------- presets


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


def test_presets_shapes_and_determinism():
    before = torch.random.get_rng_state()
    m1 = make_model(ModelSpec("tiny"), vocab_size=37, seed=3)
    assert torch.equal(before, torch.random.get_rng_state()), "global RNG must be untouched"
    assert (m1.cfg.n_layers, m1.cfg.d_model, m1.cfg.n_heads, m1.cfg.d_head, m1.cfg.d_mlp) == (
        2,
        64,
        4,
        16,
        256,
    )
    assert m1.cfg.d_vocab == 37 and m1.cfg.n_ctx == 64 and m1.cfg.act_fn == "gelu"
    assert m1.cfg.normalization_type == "LN" and m1.cfg.attention_dir == "causal"
    m2 = make_model(ModelSpec("tiny"), vocab_size=37, seed=3)
    m3 = make_model(ModelSpec("tiny"), vocab_size=37, seed=4)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    assert not torch.equal(m1.W_E, m3.W_E)
    bi = make_model(ModelSpec("tiny", attention="bidirectional", d_mlp=32), 20, 0)
    assert bi.cfg.attention_dir == "bidirectional" and bi.cfg.d_mlp == 32
    # ModelSpec overrides given as a dict or as keywords agree
    assert (
        ModelSpec("small", overrides={"n_layers": 1}).to_dict()
        == ModelSpec("small", n_layers=1).to_dict()
    )
    assert ModelSpec.from_dict(ModelSpec("base", pool="mean").to_dict()).pool == "mean"


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"preset": "huge"}, "preset"),
        ({"attention": "sideways"}, "attention"),
        ({"pool": "max"}, "pool"),
        ({"overrides": {"seed": 1}}, "seed"),
    ],
)
def test_model_spec_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ModelSpec(**kwargs)


def test_make_model_unknown_override():
    with pytest.raises(ValueError, match="not_a_field"):
        make_model(ModelSpec(not_a_field=3), vocab_size=10, seed=0)


# ---------------------------------------------------------------- final_hidden


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pool", ["last", "mean"])
def test_final_hidden_padding_equals_unpadded(attention, pool):
    model = make_model(ModelSpec("tiny", attention=attention), vocab_size=30, seed=1)
    lengths = [9, 3, 5, 1, 7]
    tokens, lens = _padded_batch(30, lengths)
    batched = final_hidden(model, tokens, lens, pool)
    assert batched.shape == (5, 64)
    for i, n in enumerate(lengths):
        alone = final_hidden(model, tokens[i : i + 1, :n], lens[i : i + 1], pool)
        assert torch.allclose(batched[i], alone[0], atol=1e-5), (i, (batched[i] - alone[0]).abs())
    # independent reference for the unpadded sequence: ln_final output from the cache
    _, cache = model.run_with_cache(tokens[:1, : lengths[0]])
    ref = cache["ln_final.hook_normalized"][0]
    expected = ref[-1] if pool == "last" else ref.mean(0)
    assert torch.allclose(batched[0], expected, atol=1e-5)
    # no hook is left behind
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())


def test_padding_mask_matters_for_bidirectional():
    """Without key masking the padded result differs: the test above is not vacuous."""
    model = make_model(ModelSpec("tiny", attention="bidirectional"), vocab_size=30, seed=1)
    tokens, lens = _padded_batch(30, [9, 3])
    unmasked = model.ln_final(model(tokens, stop_at_layer=2))[1, 2]
    masked = final_hidden(model, tokens, lens, "last")[1]
    assert (unmasked - masked).abs().max() > 1e-3


def test_final_hidden_respects_existing_hooks_and_keeps_them(tiny_model, tiny_tokens):
    lens = torch.tensor([10, 4, 7, 2, 10, 5])
    clean = final_hidden(tiny_model, tiny_tokens, lens, "last")

    def zero_heads(z, hook):
        return torch.zeros_like(z)

    tiny_model.add_hook("blocks.1.attn.hook_z", zero_heads)
    hooked = final_hidden(tiny_model, tiny_tokens, lens, "last")
    assert (clean - hooked).abs().max() > 1e-3
    assert len(tiny_model.hook_dict["blocks.1.attn.hook_z"].fwd_hooks) == 1
    assert all(
        len(tiny_model.hook_dict[f"blocks.{layer}.attn.hook_attn_scores"].fwd_hooks) == 0
        for layer in range(2)
    )
    tiny_model.reset_hooks()


def test_final_hidden_bad_input(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match="lengths"):
        final_hidden(tiny_model, tiny_tokens, torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="lengths"):
        final_hidden(tiny_model, tiny_tokens, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="n_ctx"):
        final_hidden(tiny_model, torch.ones(1, 17, dtype=torch.long), torch.tensor([17]))
    with pytest.raises(ValueError, match="token ids"):
        final_hidden(tiny_model, torch.full((1, 3), 50), torch.tensor([3]))
    with pytest.raises(ValueError, match="pool"):
        final_hidden(tiny_model, tiny_tokens, torch.full((6,), 10), pool="max")


@tl3_only
def test_final_hidden_hooked_encoder():
    from transformer_lens import HookedEncoder, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=30, n_ctx=16,
        act_fn="gelu", normalization_type="LN", attention_dir="bidirectional",
    )  # fmt: skip
    enc = HookedEncoder(cfg)
    _init_encoder(enc)
    lengths = [8, 3, 5]
    tokens, lens = _padded_batch(30, lengths, seed=2)
    for pool in ("last", "mean"):
        batched = final_hidden(enc, tokens, lens, pool)
        for i, n in enumerate(lengths):
            alone = final_hidden(enc, tokens[i : i + 1, :n], lens[i : i + 1], pool)
            assert torch.allclose(batched[i], alone[0], atol=1e-5)
    ref = enc.encoder_output(tokens[:1])[0]
    assert torch.allclose(final_hidden(enc, tokens[:1], lens[:1], "last")[0], ref[-1], atol=1e-5)


# ---------------------------------------------------------------- OOO


def test_ooo_scores_hand_computation():
    emb = torch.tensor(
        [[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]]]
    )  # unit vectors: e1, e2, (1,1)/sqrt2, -e1
    s = 2**-0.5
    # <x_i,x_j>: (0,1)=0 (0,2)=s (0,3)=-1 (1,2)=s (1,3)=0 (2,3)=-s
    expected = torch.tensor([[-(0 + s - 1), -(0 + s + 0), -(s + s - s), -(-1 + 0 - s)]])
    assert torch.allclose(ooo_scores(emb), expected, atol=1e-6)
    # scale invariance and gradient flow
    e = (torch.randn(3, 4, 5) * 1.0).requires_grad_()
    assert torch.allclose(ooo_scores(e), ooo_scores(7 * e), atol=1e-5)
    ooo_scores(e).sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all()
    with pytest.raises(ValueError, match="emb"):
        ooo_scores(torch.zeros(4, 5))


def test_encode_problems_and_accuracy():
    words = "a b c d e f g".split()
    tok = _StandInTokenizer(words)
    problems = [
        _Problem(["a b", "a b c", "a", "d e f g"], 3),
        _Problem(["c", "c d", "e", "f"], 0),
        _Problem(["g g", "a", "b c", "d"], 1),
    ]
    tokens, lengths, odd = encode_problems(problems, tok)
    assert tokens.shape == (3, 4, 5)
    assert lengths.tolist() == [[3, 4, 2, 5], [2, 3, 2, 2], [3, 2, 3, 2]]
    assert odd.tolist() == [3, 0, 1]
    assert tokens[0, 3].tolist() == [1, 5, 6, 7, 8] and tokens[1, 0].tolist() == [1, 4, 0, 0, 0]

    model = make_model(ModelSpec("tiny"), vocab_size=len(tok.vocab), seed=0)
    logits = ooo_logits_for_problems(model, problems, tok, batch_size=2)
    assert logits.shape == (3, 4) and not logits.requires_grad
    # independent computation: embed each stimulus alone, score by hand
    for p, row in zip(problems, logits):
        t, n = tok.encode_batch(p.stimuli)
        embs = torch.stack(
            [final_hidden(model, t[i : i + 1, : n[i]], n[i : i + 1])[0] for i in range(4)]
        )
        x = embs / embs.norm(dim=-1, keepdim=True)
        ref = torch.stack([-sum(x[i] @ x[j] for j in range(4) if j != i) for i in range(4)])
        assert torch.allclose(row, ref, atol=1e-5)
    acc = ooo_accuracy(model, problems, tok)
    assert acc == pytest.approx(float((logits.argmax(-1) == odd).float().mean()))
    with pytest.raises(ValueError, match="empty"):
        encode_problems([], tok)
    with pytest.raises(ValueError, match="odd_index"):
        encode_problems([_Problem(["a", "b", "c", "d"], 4)], tok)


# ---------------------------------------------------------------- label readout


def test_label_logits_last_real_position():
    model = make_model(ModelSpec("tiny"), vocab_size=25, seed=2)
    lengths = [6, 2, 4]
    tokens, lens = _padded_batch(25, lengths, seed=3)
    out = label_logits(model, tokens, lens)
    assert out.shape == (3, 25)
    for i, n in enumerate(lengths):
        ref = model(tokens[i : i + 1, :n])[0, n - 1]
        assert torch.allclose(out[i], ref, atol=1e-5)
    diff = label_logit_diff(out, 3, 4)
    assert torch.allclose(diff, out[:, 3] - out[:, 4])
    with pytest.raises(ValueError, match="no_id"):
        label_logit_diff(out, 3, 25)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_checkpoint_round_trip(tmp_path, attention):
    model = make_model(ModelSpec("tiny", attention=attention, pool="mean"), vocab_size=30, seed=5)
    with torch.no_grad():  # make weights differ from a fresh init of the same seed
        model.W_E.add_(0.5)
    tokens, lens = _padded_batch(30, [7, 4, 2], seed=4)
    save_checkpoint(tmp_path / "ck", model, None, {"task": "x", "acc": 0.97})
    loaded, tokenizer, meta = load_checkpoint(tmp_path / "ck")
    assert tokenizer is None and meta == {"task": "x", "acc": 0.97}
    assert type(loaded) is type(model) and loaded.cfg.attention_dir == attention
    assert loaded.sc_pool == "mean" and loaded.cfg.seed == 5
    assert torch.equal(label_logits(model, tokens, lens), label_logits(loaded, tokens, lens))
    assert torch.equal(final_hidden(model, tokens, lens), final_hidden(loaded, tokens, lens))
    assert not list((tmp_path / "ck").glob("*.tmp*")), "temporary files left behind"


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def test_checkpoint_with_real_tokenizer(tmp_path):
    from subroutine_circuits.tasks import get_task, make_splits

    task = get_task("agreement_singular")
    tok = task.tokenizer()
    problems = make_splits(task, {"composite": 8}, seed=1)["test"]["composite"]
    model = make_model(ModelSpec("tiny", n_ctx=32), tok.vocab_size, seed=7)
    save_checkpoint(tmp_path / "ck", model, tok, {"task": task.name})
    loaded, tok2, meta = load_checkpoint(tmp_path / "ck")
    assert meta == {"task": "agreement_singular"} and tok2.vocab_size == tok.vocab_size
    texts = problems[0].stimuli
    assert torch.equal(tok.encode_batch(texts)[0], tok2.encode_batch(texts)[0])
    a = ooo_logits_for_problems(model, problems, tok)
    b = ooo_logits_for_problems(loaded, problems, tok2)
    assert torch.equal(a, b)
