"""TransformerLens 3.9 / 4.x compatibility and local Hugging Face loading.

Runs under either installed TransformerLens: on 3.9 ``load_local_model`` gives
``HookedTransformer`` / ``HookedEncoder``, on 4.x a ``TransformerBridge``; native models are
``HookedTransformer`` (3.9, auto) or ``boot_native`` bridges (4.x, and ``backend="bridge"`` on
both). Every number is checked against an independent computation: the Hugging Face model itself,
the same sequence run without padding, or a hand-written hook.
"""

from __future__ import annotations

import socket

import pytest
import torch

from subroutine_circuits.masks import UnitMask, WeightMask
from subroutine_circuits.masks.units import UnitMap
from subroutine_circuits.models import tl_compat as tc
from subroutine_circuits.models.bridge import check_checkpoint_folder, load_local_model
from subroutine_circuits.models.presets import ModelSpec
from tests.hf_fixtures import *  # noqa: F403  (pytest fixtures: gpt2_folder, bert_folder, ...)
from tests.hf_fixtures import load_hf_reference, save_decoder_folder

TOL = 2e-5


class NetworkBlocked(RuntimeError):
    """Raised when code under test tries to open a network connection."""


@pytest.fixture
def no_network(monkeypatch):
    """Offline environment variables and sockets that refuse to connect."""

    def refuse(*args, **kwargs):
        raise NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def gpt2_loaded(gpt2_folder):
    return load_local_model(gpt2_folder)


@pytest.fixture(scope="module")
def bert_loaded(bert_folder):
    return load_local_model(bert_folder)


def _native(attention: str, backend: str = "auto"):
    spec = ModelSpec("tiny", attention=attention, n_ctx=32, n_layers=2, d_model=32, n_heads=4)
    return tc.make_native_model(spec, vocab_size=40, seed=1, backend=backend)


NATIVE_CASES = [
    ("causal", "auto"),
    ("bidirectional", "auto"),
    ("causal", "bridge"),
    ("bidirectional", "bridge"),
]


def _batch(tokenizer, texts):
    from subroutine_circuits.tasks.hf_tokenizer import HFTaskTokenizer

    kind = "encoder" if tokenizer.sep_token_id is not None else "causal"
    return HFTaskTokenizer(tokenizer, kind=kind).encode_batch(texts)


def _random_batch(vocab: int, n: int = 4, pos: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, pos), generator=g)
    lengths = torch.tensor([pos, pos - 3, 2, pos - 1][:n])
    return tokens, lengths


# ----------------------------------------------------------------------------- versions


def test_version_detection():
    import transformer_lens

    major = tc.tl_major()
    assert major in (3, 4)
    has_hooked = True
    try:
        transformer_lens.HookedTransformer  # noqa: B018
    except (ImportError, AttributeError):
        has_hooked = False
    assert has_hooked == (major < 4)


@pytest.mark.parametrize("attention,backend", NATIVE_CASES)
def test_native_model_kind_and_determinism(attention, backend):
    model = _native(attention, backend)
    assert not model.training
    want_bridge = backend == "bridge" or tc.tl_major() >= 4
    assert tc.is_bridge(model) == want_bridge
    assert model.cfg.attention_dir == attention and model.sc_pool == "last"
    again = _native(attention, backend)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    state = torch.random.get_rng_state()
    _native(attention, backend)
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG was touched"


def test_native_bad_input():
    with pytest.raises(ValueError, match="backend"):
        tc.make_native_model(backend="onnx")
    with pytest.raises(ValueError, match="ModelSpec"):
        tc.make_native_model(spec="tiny")
    if tc.tl_major() >= 4:
        with pytest.raises(ValueError, match="3.x"):
            tc.make_native_model(backend="hooked")


# ----------------------------------------------------------------------------- readouts


@pytest.mark.parametrize("attention,backend", NATIVE_CASES)
def test_final_hidden_ignores_padding(attention, backend):
    """Each padded row equals the same sequence run alone without padding."""
    model = _native(attention, backend)
    tokens, lengths = _random_batch(40)
    with torch.no_grad():
        batch = tc.final_hidden(model, tokens, lengths)
        mean = tc.final_hidden(model, tokens, lengths, pool="mean")
        for i, n in enumerate(lengths.tolist()):
            alone = tc.final_resid(model, tokens[i : i + 1, :n], torch.tensor([n]))
            assert torch.allclose(batch[i], alone[0, -1], atol=TOL)
            assert torch.allclose(mean[i], alone[0].mean(0), atol=TOL)


@pytest.mark.parametrize("attention,backend", NATIVE_CASES)
def test_final_resid_is_ln_final_output(attention, backend):
    model = _native(attention, backend)
    tokens = torch.randint(0, 40, (3, 6))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
        want = model.ln_final(last)
        got = tc.final_resid(model, tokens, torch.full((3,), 6))
    assert torch.allclose(got, want, atol=TOL)


def test_gpt2_folder_logits_and_hidden_equal_hf(gpt2_loaded, gpt2_folder, hf_texts):
    model, tokenizer = gpt2_loaded
    hf = load_hf_reference(gpt2_folder)
    tokens, lengths = _batch(tokenizer, hf_texts[:6])
    mask = tc.attention_mask_from_lengths(lengths, tokens.shape[1])
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, output_hidden_states=True)
        logits = tc.full_logits(model, tokens, lengths)
        hidden = tc.final_hidden(model, tokens, lengths)
    real = mask.bool()
    assert torch.allclose(logits[real], ref.logits[real], atol=1e-4)
    last = ref.hidden_states[-1][torch.arange(6), lengths - 1]  # GPT-2's last includes ln_f
    assert torch.allclose(hidden, last, atol=1e-4)


def test_bert_folder_hidden_and_logits_equal_hf(bert_loaded, bert_folder, hf_texts):
    model, tokenizer = bert_loaded
    assert tc.is_encoder(model)
    hf = load_hf_reference(bert_folder)
    tokens, lengths = _batch(tokenizer, hf_texts[:6])
    mask = tc.attention_mask_from_lengths(lengths, tokens.shape[1])
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, output_hidden_states=True)
        hidden = tc.final_hidden(model, tokens, lengths)
        logits = tc.full_logits(model, tokens, lengths)
    real = mask.bool()
    last = ref.hidden_states[-1][torch.arange(6), lengths - 1]  # the [SEP] readout position
    assert torch.allclose(hidden, last, atol=1e-4)
    assert torch.allclose(logits[real], ref.logits[real], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_llama_and_pythia_style_folders(family, tmp_path, bpe_tokenizer, hf_texts):
    """4.x loads them through the bridge (outputs = HF); 3.9 refuses them with a clear error."""
    folder = save_decoder_folder(tmp_path / family, bpe_tokenizer, family)
    if tc.tl_major() < 4:
        with pytest.raises(ValueError, match="unsupported architecture"):
            load_local_model(folder)
        return
    model, tokenizer = load_local_model(folder)
    hf = load_hf_reference(folder)
    tokens, lengths = _batch(tokenizer, hf_texts[:5])
    mask = tc.attention_mask_from_lengths(lengths, tokens.shape[1])
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, output_hidden_states=True)
        logits = tc.full_logits(model, tokens, lengths)
        hidden = tc.final_hidden(model, tokens, lengths)
        resumed = tc.final_norm(
            model, tc.run_from_layer(model, tc.resid_pre(model, tokens, 1, mask), 1, mask)
        )
    real = mask.bool()
    assert torch.allclose(logits[real], ref.logits[real], atol=1e-4)
    assert torch.allclose(hidden, ref.hidden_states[-1][torch.arange(5), lengths - 1], atol=1e-4)
    assert torch.allclose(resumed[real], tc.final_resid(model, tokens, lengths)[real], atol=1e-4)
    kinds = [w.kind for w in tc.maskable_weights(model) if w.layer == 0]
    want = ["W_Q", "W_K", "W_V", "W_O", "W_in"] + (["W_gate"] if family == "llama" else [])
    assert kinds == want + ["W_out"]
    assert UnitMap(tc.unit_groups(model)).n_units == 2 * (4 + 64)


def test_loading_is_offline(no_network, gpt2_folder, bert_folder):
    for folder in (gpt2_folder, bert_folder):
        model, tokenizer = load_local_model(folder)
        assert len(tokenizer) == model.cfg.d_vocab


def test_loader_errors(tmp_path, gpt2_folder):
    with pytest.raises(ValueError, match="not a directory"):
        load_local_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="config.json"):
        load_local_model(tmp_path)
    with pytest.raises(ValueError, match="backend"):
        load_local_model(gpt2_folder, backend="vllm")
    # a model folder without its tokenizer is refused (4.x would silently build an empty one)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((gpt2_folder / name).read_bytes())
    with pytest.raises(ValueError, match="no tokenizer files"):
        check_checkpoint_folder(bare)
    if tc.tl_major() >= 4:
        with pytest.raises(ValueError, match="3.x"):
            load_local_model(gpt2_folder, backend="hooked")


# ----------------------------------------------------------------------------- run from a layer


def _models(gpt2_loaded, bert_loaded):
    return {
        "native_causal": _native("causal"),
        "native_bidir_bridge": _native("bidirectional", "bridge"),
        "gpt2": gpt2_loaded[0],
        "bert": bert_loaded[0],
    }


def test_run_from_layer_and_resid_pre(gpt2_loaded, bert_loaded):
    """Resuming at block k from another input's residual reproduces that input's run."""
    for name, model in _models(gpt2_loaded, bert_loaded).items():
        vocab = min(int(model.cfg.d_vocab), 40)
        a = torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
        b = torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(2))
        n = torch.full((2,), 7)
        with torch.no_grad():
            want = tc.final_resid(model, b, n)
            for layer in range(model.cfg.n_layers):
                r = tc.resid_pre(model, b, layer)
                out = tc.final_norm(model, tc.run_from_layer(model, r, layer))
                assert torch.allclose(out, want, atol=1e-4), (name, layer)
            # with hooks on the model: a zeroed head in the last layer changes the result the
            # same way in a full pass and in a resumed one
            last = model.cfg.n_layers - 1

            def kill(z, hook):
                z = z.clone()
                z[:, :, 0] = 0
                return z

            with model.hooks(fwd_hooks=[(f"blocks.{last}.attn.hook_z", kill)]):
                full = tc.final_resid(model, a, n)
                resumed = tc.final_norm(
                    model, tc.run_from_layer(model, tc.resid_pre(model, a, last), last)
                )
            assert torch.allclose(full, resumed, atol=1e-4), name
            assert not torch.allclose(full, tc.final_resid(model, a, n), atol=1e-4), name
    with pytest.raises(ValueError, match="out of range"):
        tc.run_from_layer(model, want, 7)


# ----------------------------------------------------------------------------- units and masks


def test_unit_groups_match_unit_map(gpt2_loaded, bert_loaded):
    from subroutine_circuits.adapters import as_adapter

    for name, model in _models(gpt2_loaded, bert_loaded).items():
        groups = tc.unit_groups(model)
        assert UnitMap(groups) == as_adapter(model).unit_map(), name
        n_layers, n_heads, d_mlp = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_mlp
        assert UnitMap(groups).n_units == n_layers * (n_heads + d_mlp)
        assert [g.hook_name for g in tc.unit_groups(model, ("head",), [1])] == [
            "blocks.1.attn.hook_z"
        ]
    with pytest.raises(ValueError, match="unit kind"):
        tc.unit_groups(model, ("channel",))


def test_unit_mask_on_every_model(gpt2_loaded, bert_loaded):
    """All-ones mask = unmasked outputs; a mask dropping one head = a hand hook zeroing it."""
    for name, model in _models(gpt2_loaded, bert_loaded).items():
        vocab = min(int(model.cfg.d_vocab), 40)
        tokens, lengths = _random_batch(vocab, seed=4)
        umap = UnitMap(tc.unit_groups(model))
        # BERT bridges carry permanent hooks of their own (TransformerLens wiring)
        before = {k: list(hp.fwd_hooks) for k, hp in model.hook_dict.items()}
        with torch.no_grad():
            base = tc.final_hidden(model, tokens, lengths)
            ones = UnitMask.fixed(umap, torch.ones(umap.n_units, dtype=torch.bool))
            with ones.applied(model):
                same = tc.final_hidden(model, tokens, lengths)
            assert torch.equal(same, base), name
            keep = torch.ones(umap.n_units, dtype=torch.bool)
            keep[1] = False  # head 1 of layer 0 (group order: heads of layer 0 first)
            drop = UnitMask.fixed(umap, keep, ablation="zero")
            with drop.applied(model):
                masked = tc.final_hidden(model, tokens, lengths)

            def zero_head(z, hook):
                z = z.clone()
                z[:, :, 1] = 0
                return z

            with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_head)]):
                hand = tc.final_hidden(model, tokens, lengths)
        assert torch.allclose(masked, hand, atol=1e-6), name
        assert not torch.allclose(masked, base, atol=1e-4), name
        after = {k: list(hp.fwd_hooks) for k, hp in model.hook_dict.items()}
        assert after == before, (name, "hooks left behind")


def test_maskable_weights_and_weight_mask(gpt2_loaded, bert_loaded):
    for name, model in _models(gpt2_loaded, bert_loaded).items():
        weights = tc.maskable_weights(model)
        kinds = [w.kind for w in weights]
        assert kinds == ["W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"] * model.cfg.n_layers, name
        params = dict(model.named_parameters()) if not tc.is_bridge(model) else None
        tl_params = model.tl_parameters() if tc.is_bridge(model) else params
        for w in weights:
            module = model.get_submodule(w.name.rpartition(".")[0])
            value = module._parameters[w.name.rpartition(".")[2]]
            assert tuple(value.shape) == w.shape
            ref = tl_params[w.tl_name]
            # same numbers, whatever the layout ([n_heads, d_model, d_head] vs [out, in])
            assert torch.allclose(
                value.detach().flatten().sort().values, ref.detach().flatten().sort().values
            ), (name, w.tl_name)

        tokens, lengths = _random_batch(min(int(model.cfg.d_vocab), 40), seed=5)
        names = [w.name for w in weights]
        n = sum(torch.Size(w.shape).numel() for w in weights)
        with torch.no_grad():
            base = tc.final_hidden(model, tokens, lengths)
            ones = WeightMask.fixed(model, torch.ones(n, dtype=torch.bool), param_names=names)
            with ones.applied(model):
                same = tc.final_hidden(model, tokens, lengths)
            assert torch.allclose(same, base, atol=1e-6), name
            keep = torch.ones(n, dtype=torch.bool)
            keep[: torch.Size(weights[0].shape).numel()] = False  # layer 0's W_Q entirely
            wq = WeightMask.fixed(model, keep, param_names=names)
            with wq.applied(model):
                masked = tc.final_hidden(model, tokens, lengths)
            first = weights[0]
            module = model.get_submodule(first.name.rpartition(".")[0])
            pname = first.name.rpartition(".")[2]
            orig = module._parameters[pname]
            module._parameters[pname] = torch.nn.Parameter(torch.zeros_like(orig))
            try:
                hand = tc.final_hidden(model, tokens, lengths)
            finally:
                module._parameters[pname] = orig
        assert torch.allclose(masked, hand, atol=1e-6), name
        assert not torch.allclose(masked, base, atol=1e-4), name
