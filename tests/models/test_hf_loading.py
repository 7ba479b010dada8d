"""Loading local Hugging Face checkpoints (GPT-2, BERT) into TransformerLens, fully offline.

Every checkpoint is a randomly initialised ``transformers`` model written with ``save_pretrained``
to ``tmp_path``; the loaded TransformerLens model must reproduce the Hugging Face outputs.
Network access is blocked (sockets refuse to connect) for every test in this file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from subroutine_circuits.models.hf import SUPPORTED_ARCHITECTURES, load_hf_checkpoint
from tests.tl_versions import tl3_only

TOL = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS = ["the", "cat", "dog", "sees", "see", "cats", "dogs", "runs", "run", "a"]


class NetworkBlocked(RuntimeError):
    """Raised when code under test tries to open a network connection."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Offline environment variables, and sockets that refuse to connect."""

    def refuse(*args, **kwargs):
        raise NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _tokens(n: int, pos: int, vocab: int, seed: int) -> torch.Tensor:
    """Random token ids [n, pos] in [0, vocab)."""
    return torch.randint(0, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def _gpt2_tokenizer():
    """A word-level fast tokenizer over WORDS, built locally (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
    )


def _bert_tokenizer(directory: Path):
    """A WordPiece BERT tokenizer over WORDS, built from a local vocab.txt."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer(str(directory / "vocab.txt"))


def _save_gpt2(path: Path, seed: int = 0, **overrides):
    """Save a random small GPT2LMHeadModel to ``path``; return it in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kwargs = dict(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**kwargs, attn_implementation="eager")).eval()
    hf.save_pretrained(path)
    return hf


def _bert_config(**overrides):
    """A small BertConfig (exact GELU, eager attention)."""
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        hidden_act="gelu",
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs, attn_implementation="eager")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "activation_function": "relu",
            "n_inner": 96,
            "scale_attn_by_inverse_layer_idx": True,
            "layer_norm_epsilon": 1e-3,
        },
    ],
    ids=["default", "relu_ninner_layerscale"],
)
@tl3_only
def test_gpt2_logits_match_hf(tmp_path, overrides):
    """GPT-2 -> causal HookedTransformer; logits equal HF logits; no LN folding applied."""
    from transformer_lens import HookedTransformer

    hf = _save_gpt2(tmp_path / "gpt2", seed=1, **overrides)
    model, tokenizer = load_hf_checkpoint(tmp_path / "gpt2")

    assert isinstance(model, HookedTransformer)
    assert tokenizer is None and model.tokenizer is None
    assert model.cfg.attention_dir == "causal"
    assert model.cfg.normalization_type == "LN"  # not folded into LNPre
    assert model.cfg.d_mlp == overrides.get("n_inner", 4 * 64)
    assert not model.training

    tokens = _tokens(3, 20, 100, seed=2)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert got.shape == expected.shape == (3, 20, 100)
    assert (got - expected).abs().max().item() <= TOL
    # the comparison is not vacuous: logits vary across positions and vocab
    assert expected.std().item() > 1e-2
    # causal: changing the last token must not change earlier logits
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    with torch.no_grad():
        got2 = model(changed)
    assert torch.allclose(got2[:, :-1], got[:, :-1], atol=1e-6)
    assert (got2[:, -1] - got[:, -1]).abs().max().item() > 1e-4


@tl3_only
def test_gpt2_with_tokenizer(tmp_path):
    """A saved tokenizer is loaded offline, returned and attached; text input matches HF."""
    hf = _save_gpt2(tmp_path / "gpt2tok", seed=3)
    _gpt2_tokenizer().save_pretrained(tmp_path / "gpt2tok")

    model, tokenizer = load_hf_checkpoint(tmp_path / "gpt2tok")
    assert tokenizer is not None and model.tokenizer is not None
    text = "the cat sees a dog"
    ids = tokenizer(text)["input_ids"]
    assert ids == [2 + WORDS.index(w) for w in text.split()]

    tl_tokens = model.to_tokens(text)  # TransformerLens prepends BOS (id 0)
    assert tl_tokens[0].tolist() == [0, *ids]
    with torch.no_grad():
        expected = hf(torch.tensor([[0, *ids]])).logits
        got = model(text)
    assert (got - expected).abs().max().item() <= TOL


@tl3_only
def test_bert_hidden_states_and_mlm_logits_match_hf(tmp_path):
    """BertForMaskedLM -> HookedEncoder; final hidden states and MLM logits equal HF's."""
    from transformer_lens import HookedEncoder
    from transformers import BertForMaskedLM

    torch.manual_seed(4)
    hf = BertForMaskedLM(_bert_config()).eval()
    hf.save_pretrained(tmp_path / "bert")
    assert hf.config._attn_implementation == "eager"

    model, tokenizer = load_hf_checkpoint(tmp_path / "bert")
    assert isinstance(model, HookedEncoder)
    assert tokenizer is None
    assert model.cfg.attention_dir == "bidirectional"

    tokens = _tokens(3, 16, 100, seed=5)
    token_types = torch.zeros_like(tokens)
    token_types[:, 8:] = 1
    with torch.no_grad():
        out = hf(tokens, token_type_ids=token_types, output_hidden_states=True)
        hidden = model.encoder_output(tokens, token_types)
        logits = model(tokens, token_type_ids=token_types)
    assert (hidden - out.hidden_states[-1]).abs().max().item() <= TOL
    assert (logits - out.logits).abs().max().item() <= TOL
    assert out.logits.std().item() > 1e-2

    # padding: HF attention_mask and HookedEncoder one_zero_attention_mask agree on real tokens
    mask = torch.ones_like(tokens)
    mask[0, 10:] = 0
    with torch.no_grad():
        expected = hf(tokens, attention_mask=mask).logits
        got = model(tokens, one_zero_attention_mask=mask)
    assert (got[0, :10] - expected[0, :10]).abs().max().item() <= TOL
    assert (got[1:] - expected[1:]).abs().max().item() <= TOL
    # bidirectional: changing the last token changes the first position's output
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    with torch.no_grad():
        assert (model(changed)[:, 0] - logits[:, 0]).abs().max().item() > 1e-4


@tl3_only
def test_bert_with_tokenizer_and_relu(tmp_path):
    """BERT with hidden_act='relu' (MLP and MLM head) and a saved tokenizer; text input works."""
    from transformers import BertForMaskedLM

    torch.manual_seed(6)
    hf = BertForMaskedLM(_bert_config(hidden_act="relu")).eval()
    hf.save_pretrained(tmp_path / "bert_tok")
    _bert_tokenizer(tmp_path / "vocab_src").save_pretrained(tmp_path / "bert_tok")

    model, tokenizer = load_hf_checkpoint(str(tmp_path / "bert_tok"))
    assert tokenizer is not None and model.tokenizer is tokenizer
    enc = tokenizer(["the cat sees a dog", "dogs run"], return_tensors="pt", padding=True)
    assert enc["input_ids"][0].tolist() == [
        2,
        *[5 + WORDS.index(w) for w in "the cat sees a dog".split()],
        3,
    ]
    with torch.no_grad():
        expected = hf(**enc).logits
        got = model(["the cat sees a dog", "dogs run"])
    real = enc["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL


@tl3_only
def test_bert_model_without_heads(tmp_path):
    """A bare BertModel: exact hidden states; placeholder MLM head is finite and warned about."""
    from transformers import BertModel

    torch.manual_seed(7)
    hf = BertModel(_bert_config()).eval()
    hf.save_pretrained(tmp_path / "bare")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_hf_checkpoint(tmp_path / "bare")
    assert any("no masked-LM head" in str(w.message) for w in caught)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tokens = _tokens(2, 12, 100, seed=8)
    with torch.no_grad():
        expected = hf(tokens).last_hidden_state
        got = model.encoder_output(tokens)
    assert (got - expected).abs().max().item() <= TOL


def test_error_not_a_directory(tmp_path):
    """A missing path and a file path are both rejected with a message naming the problem."""
    with pytest.raises(ValueError, match="not a directory"):
        load_hf_checkpoint(tmp_path / "does_not_exist")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        load_hf_checkpoint(a_file)


def test_error_no_config(tmp_path):
    """A directory without config.json is rejected."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_checkpoint(tmp_path / "empty")


def test_error_unsupported_architecture(tmp_path):
    """An unsupported architecture is named, and the supported ones are listed."""
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    with pytest.raises(ValueError, match="LlamaForCausalLM") as info:
        load_hf_checkpoint(d)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(info.value)


def test_error_no_weights(tmp_path):
    """A GPT-2 config without any weights file is rejected before transformers is asked."""
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="no weights file"):
        load_hf_checkpoint(d)


def test_import_is_offline_and_light(tmp_path):
    """Importing the module (HF_HUB_OFFLINE=1, sockets blocked) loads no HF / TL code."""
    script = textwrap.dedent(
        f"""
        import importlib.util, socket, sys

        def refuse(*a, **k):
            raise RuntimeError("network access attempted")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        spec = importlib.util.spec_from_file_location(
            "hf_standalone", {str(REPO_ROOT / "subroutine_circuits" / "models" / "hf.py")!r}
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert callable(mod.load_hf_checkpoint)
        heavy = sorted(m for m in ("transformers", "transformer_lens") if m in sys.modules)
        assert not heavy, heavy
        import subroutine_circuits.models.hf as packaged
        assert callable(packaged.load_hf_checkpoint)
        print("ok")
        """
    )
    env = dict(os.environ)  # carries HF_HUB_OFFLINE=1 from the fixture
    assert env["HF_HUB_OFFLINE"] == "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
