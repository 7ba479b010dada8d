"""The TransformerLens 4 bridge adapter (and encoder patching on 3.9) against independent code.

Models are tiny random Hugging Face checkpoints with their own tokenizers (``tests.hf_fixtures``),
loaded as ``TransformerBridge`` (``backend="bridge"``, available on 3.9 and 4.x) and, on 3.9,
also as ``HookedTransformer`` / ``HookedEncoder`` (``backend="hooked"``). References: the Hugging
Face model itself, hand-written hooks run one stimulus at a time, hand-written patching loops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subroutine_circuits.adapters import BridgeAdapter, as_adapter
from subroutine_circuits.masks import UnitMask
from subroutine_circuits.models import tl_compat as tc
from subroutine_circuits.models.bridge import load_local_model
from subroutine_circuits.patching.activation import activation_patching
from subroutine_circuits.patching.attribution import attribution_patching
from subroutine_circuits.tasks.hf_tokenizer import HFTaskTokenizer
from tests.hf_fixtures import *  # noqa: F403  (pytest fixtures: gpt2_folder, bert_folder, ...)
from tests.hf_fixtures import load_hf_reference

TOL = 2e-5
TEXTS = [
    "the horse near the dogs runs",
    "the horses run",
    "the dog near the horse sleeps",
    "the dogs sleep",
]
# backends every installed TransformerLens can load a folder with
BACKENDS = ["bridge"] + (["hooked"] if tc.tl_major() < 4 else [])
CASES = [(kind, backend) for kind in ("gpt2", "bert") for backend in BACKENDS]


@pytest.fixture(scope="module")
def loaded(gpt2_folder, bert_folder):
    """(kind, backend) -> (adapter, folder); models loaded once per module."""
    cache = {}

    def get(kind: str, backend: str):
        if (kind, backend) not in cache:
            folder = gpt2_folder if kind == "gpt2" else bert_folder
            model, tok = load_local_model(folder, backend=backend)
            task_tok = HFTaskTokenizer(tok, kind="causal" if kind == "gpt2" else "encoder")
            cache[kind, backend] = (as_adapter(model, tokenizer=task_tok).freeze(), folder)
        return cache[kind, backend]

    return get


def _hf_hidden(folder, tokens, lengths):
    """Final hidden states of the Hugging Face model (``ln_f`` output / BERT encoder output)."""
    ref = load_hf_reference(folder)
    body = ref.transformer if hasattr(ref, "transformer") else ref.bert
    mask = tc.attention_mask_from_lengths(lengths, tokens.shape[1])
    with torch.no_grad():
        return body(input_ids=tokens, attention_mask=mask).last_hidden_state


def test_bridges_get_the_bridge_adapter(loaded):
    for kind in ("gpt2", "bert"):
        adapter, _ = loaded(kind, "bridge")
        assert isinstance(adapter, BridgeAdapter)
        assert adapter.is_encoder == (kind == "bert")
        um = adapter.unit_map()
        names = [g.hook_name for g in um.groups]
        assert names == [
            "blocks.0.attn.hook_z",
            "blocks.0.mlp.hook_post",
            "blocks.1.attn.hook_z",
            "blocks.1.mlp.hook_post",
        ]
        assert um.n_units == 2 * (4 + 64)
        assert adapter.unit_map(kinds=["head"], layers=[1]).n_units == 4
        assert adapter.signature()["d_mlp"] == 64
        assert adapter.init_std() == pytest.approx(0.02)
    with pytest.raises(ValueError, match="TransformerBridge"):
        BridgeAdapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_embed_and_ooo_equal_the_hf_model(loaded, kind):
    """Readout token hidden state (padded batch) = HF last_hidden_state at the last real token."""
    adapter, folder = loaded(kind, "bridge")
    inputs = adapter.encode_stimuli(TEXTS)
    tokens, lengths = inputs["tokens"], inputs["lengths"]
    assert len(set(lengths.tolist())) > 1  # really padded
    assert (tokens[torch.arange(4), lengths - 1] == adapter.tokenizer.readout_id).all()
    with torch.no_grad():
        emb = adapter.embed(inputs)
        scores = adapter.ooo_logits({k: v.view(1, 4, *v.shape[1:]) for k, v in inputs.items()})
    hidden = _hf_hidden(folder, tokens, lengths)
    want = hidden[torch.arange(4), lengths - 1]
    torch.testing.assert_close(emb, want, atol=TOL, rtol=0)
    x = F.normalize(want.double(), dim=-1)
    gram = x @ x.T
    want_scores = -(gram.sum(-1) - gram.diagonal())
    torch.testing.assert_close(scores[0].double(), want_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,backend", CASES)
def test_mean_ablation_equals_hand_written_hook(loaded, kind, backend):
    """record_activations keeps the requested (aliased) hook names and ignores padding; a mean-
    ablated head equals a hand hook with the mean of activations of each text run alone."""
    adapter, _ = loaded(kind, backend)
    model = adapter.model
    hook = "blocks.0.attn.hook_z"
    inputs = adapter.encode_stimuli(TEXTS)
    rec = adapter.record_activations(inputs, [hook])
    assert set(rec.acts) == {hook}
    singles = []
    for text in TEXTS:
        one = adapter.encode_stimuli([text])
        acts = adapter.record_activations(one, [hook]).acts[hook][0]
        n = int(one["lengths"][0])
        torch.testing.assert_close(
            rec.acts[hook][TEXTS.index(text), :n], acts[:n], atol=TOL, rtol=0
        )
        singles.append(acts[:n])
    mean_h1 = torch.cat(singles)[:, 1].mean(0)  # [d_head], over every real position

    um = adapter.unit_map(kinds=["head"], layers=[0])
    keep = torch.ones(um.n_units, dtype=torch.bool)
    keep[1] = False
    mask = UnitMask.fixed(um, keep, "mean")
    mask.set_mean(adapter, inputs)

    def by_hand(act, hook):
        act = act.clone()
        act[:, :, 1] = mean_h1
        return act

    with torch.no_grad():
        with mask.applied(model):
            got = adapter.embed(inputs)
        with model.hooks(fwd_hooks=[(hook, by_hand)]):
            want = adapter.embed(inputs)
        plain = adapter.embed(inputs)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert (got - plain).abs().max() > 1e-4  # the ablation did something


def _pairs(adapter, n: int = 3):
    """``n`` minimal pairs of the agreement task that align token by token, all of one length:
    (clean, corrupted) token tensors."""
    from subroutine_circuits.experiment.patching import sample_pairs
    from subroutine_circuits.tasks import get_task

    tok = adapter.tokenizer
    by_len: dict[int, list] = {}
    for a, b, _ in sample_pairs(get_task("agreement_singular"), "verb_plural", 60, seed=0):
        r = tok.align_pair(a, b)
        if r.ok:
            by_len.setdefault(len(r.a.ids), []).append(r)
    same = max(by_len.values(), key=len)[:n]
    assert len(same) == n
    return torch.tensor([r.a.ids for r in same]), torch.tensor([r.b.ids for r in same])


def _final_hidden(adapter, tokens):
    """Normalised final hidden state at the last position of unpadded tokens."""
    n = torch.full((tokens.shape[0],), tokens.shape[1])
    return tc.final_hidden(adapter.model, tokens, n, "last")


@pytest.mark.parametrize("kind,backend", CASES)
def test_activation_patching_equals_hand_loop(loaded, kind, backend):
    """Generic patching path on bridges and encoders = patching one head at a time by hand."""
    adapter, _ = loaded(kind, backend)
    model = adapter.model
    clean, corr = _pairs(adapter)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(int(model.cfg.d_model), generator=g)

    def metric(hidden):
        return hidden.float() @ direction

    groups = adapter.unit_map(kinds=["head"]).groups
    res = activation_patching(adapter, clean, corr, metric, groups, readout="hidden_last")
    with torch.no_grad():
        assert res.clean_metric == pytest.approx(
            float(metric(_final_hidden(adapter, clean)).mean()), abs=1e-4
        )
        for grp in groups:
            cache = {}

            def grab(act, hook, cache=cache):
                cache["z"] = act.clone()

            with model.hooks(fwd_hooks=[(grp.hook_name, grab)]):
                _final_hidden(adapter, clean)
            for head in range(grp.size):

                def put(act, hook, head=head, cache=cache):
                    act = act.clone()
                    act[:, :, head] = cache["z"][:, :, head]
                    return act

                with model.hooks(fwd_hooks=[(grp.hook_name, put)]):
                    want = float(metric(_final_hidden(adapter, corr)).mean())
                got = float(res.patched[grp.hook_name][head])
                assert got == pytest.approx(want, abs=1e-4), (grp.hook_name, head)


@pytest.mark.parametrize("kind,backend", CASES)
def test_attribution_patching_equals_hand_gradient(loaded, kind, backend):
    """Attribution estimate = (a_clean - a_corr) . d metric / d a at the corrupted run, with the
    gradient taken by hand (activation replaced by a leaf tensor)."""
    adapter, _ = loaded(kind, backend)
    model = adapter.model
    clean, corr = _pairs(adapter)
    direction = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(1))

    def metric(hidden):
        return hidden.float() @ direction

    name = "blocks.0.mlp.hook_post"
    groups = [g for g in adapter.unit_map().groups if g.hook_name == name]
    res = attribution_patching(adapter, clean, corr, metric, groups, readout="hidden_last")
    acts = {}

    def grab(act, hook):
        acts["clean"] = act.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, grab)]):
        _final_hidden(adapter, clean)

    def leaf(act, hook):
        acts["corr"] = act.detach().clone().requires_grad_(True)
        return acts["corr"]

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, leaf)]):
        m = metric(_final_hidden(adapter, corr)).mean()
        (grad,) = torch.autograd.grad(m, [acts["corr"]])
    est = ((acts["clean"] - acts["corr"].detach()) * grad).sum((0, 1))
    torch.testing.assert_close(res.patched[name] - res.corr_metric, est.float(), atol=1e-4, rtol=0)
    assert est.abs().max() > 1e-6


def test_reinit_uses_the_architecture_initialiser(gpt2_folder):
    """reinit(seed) equals loading the folder re-initialised with that seed; seeds differ."""
    from subroutine_circuits.experiment.hf import load_hf_model

    model, _ = load_hf_model(gpt2_folder, backend="bridge")
    adapter = as_adapter(model)
    name = adapter.weight_names()[0]

    def weight(m):  # maskable weight names resolve through the registered module tree
        return m.get_submodule(name.rsplit(".", 1)[0]).weight.detach().clone()

    before = weight(model)
    adapter.reinit(3)
    after = weight(model)
    fresh, _ = load_hf_model(gpt2_folder, backend="bridge", reinit_seed=3)
    torch.testing.assert_close(after, weight(fresh), atol=0, rtol=0)
    assert not torch.equal(before, after)
    assert after.std().item() == pytest.approx(0.02, rel=0.2)  # GPT-2's initializer_range
    adapter.reinit(4)
    assert not torch.equal(after, weight(model))


def test_native_bridge_reinit_and_readout():
    """A boot_native bridge: reinit rebuilds it with the seed; logits readout = model logits."""
    from subroutine_circuits.models.presets import ModelSpec

    spec = ModelSpec("tiny", n_ctx=16, n_layers=2, d_model=32, n_heads=4)
    model = tc.make_native_model(spec, vocab_size=30, seed=1, backend="bridge")
    adapter = as_adapter(model)
    assert isinstance(adapter, BridgeAdapter)
    tokens = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = adapter.forward(tokens, adapter.readout("logits"))
        torch.testing.assert_close(logits, model(tokens), atol=TOL, rtol=0)
        adapter.reinit(7)
        other = tc.make_native_model(spec, vocab_size=30, seed=7, backend="bridge")
        torch.testing.assert_close(model(tokens), other(tokens), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="unknown readout"):
        adapter.readout("nope")


# eight stimuli of several lengths: two odd-one-out problems
EIGHT = TEXTS + [
    "the horse sleeps",
    "the dogs near the horses run",
    "the dog runs",
    "the horses near the dog sleep",
]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_batched_mean_ablation_of_a_head_equals_hand_hook(loaded, kind):
    """The batched mask engine (fixed masks, and trainable masks in eval mode, as in training
    and validation) mean-ablating head ``h`` of layer ``l`` on a bridge = a hand hook replacing
    that head's ``hook_z`` by its position-aware mean, computed from each stimulus run alone.

    ``hook_z`` on a bridge is an alias of ``attn.o.hook_in`` with a layout conversion (raw flat
    ``[b, pos, n_heads * d_head]``): the engine must apply the means in the layout in which
    they were recorded, ``[b, pos, head, d_head]``, on the right head."""
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.adapters.padded import ooo_scores_padded
    from subroutine_circuits.experiment.batched import (
        BatchedUnitMask,
        fixed_mask_scores,
    )
    from subroutine_circuits.masks.ablator import reference_ablator
    from subroutine_circuits.masks.parametrization import MaskConfig

    adapter, _ = loaded(kind, "bridge")
    model = adapter.model
    layer, head = 1, 2
    hook = f"blocks.{layer}.attn.hook_z"
    flat = adapter.encode_stimuli(EIGHT)
    lengths = flat["lengths"]
    data = EncodedProblems(
        {k: v.view(2, 4, *v.shape[1:]) for k, v in flat.items()}, torch.tensor([0, 3])
    )

    # independent position-aware means: every stimulus alone (no padding), the head's z
    readout_z, other_z = [], []
    for text in EIGHT:
        one = adapter.encode_stimuli([text])
        n = int(one["lengths"][0])
        seen = {}

        def grab(act, hook, seen=seen):
            seen["z"] = act.detach()[0, :, head]  # [pos, d_head]

        with torch.no_grad(), model.hooks(fwd_hooks=[(hook, grab)]):
            model(one["tokens"][:, :n])
        readout_z.append(seen["z"][n - 1])
        other_z.append(seen["z"][: n - 1])
    readout_mean = torch.stack(readout_z).mean(0)
    other_mean = torch.cat(other_z).mean(0)

    def by_hand(act, hook):
        act = act.clone()
        ro = torch.arange(act.shape[1])[None, :] == (lengths[:, None] - 1)
        act[:, :, head] = torch.where(ro[..., None], readout_mean, other_mean)
        return act

    with torch.no_grad():
        plain = adapter.ooo_logits(data.inputs)
        with model.hooks(fwd_hooks=[(hook, by_hand)]):
            want = adapter.ooo_logits(data.inputs)
    assert (want - plain).abs().max() > 1e-4  # the ablation does something

    um = adapter.unit_map(kinds=["head"])
    ablator = reference_ablator(adapter, um, data.flat_inputs(), "mean")
    assert ablator.position_aware
    unit = next(off + head for off, g in zip(um.offsets(), um.groups) if g.hook_name == hook)
    keep = torch.ones(2, um.n_units, dtype=torch.bool)
    keep[1, unit] = False  # mask 0 keeps everything, mask 1 ablates the head

    got = fixed_mask_scores(model, data, keep, unit_map=um, ablator=ablator)
    torch.testing.assert_close(got[0], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want, atol=1e-5, rtol=0)

    # the training / converged engine's hooks: K masks on K slices of one batch
    cfgs = [MaskConfig(ablation="mean", seed=i) for i in range(2)]
    bm = BatchedUnitMask(um, cfgs, None, ablator=ablator)
    with torch.no_grad():
        bm.logits.copy_(torch.where(keep, 10.0, -10.0))
    bm.eval()
    assert torch.equal(bm.binary(), keep)
    tokens, lens = data.tokens.repeat(2, 1, 1), data.lengths.repeat(2, 1)
    width = int(lens.max())
    tokens = tokens[..., :width]
    with torch.no_grad(), bm.applied(model):
        bm.begin_batch(model, tokens.reshape(-1, width), lens.reshape(-1), {})
        scores = ooo_scores_padded(model, tokens, lens, adapter.pool, {})
    torch.testing.assert_close(scores[:2], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[2:], want, atol=1e-5, rtol=0)
