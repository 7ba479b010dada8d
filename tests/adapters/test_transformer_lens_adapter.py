"""The TransformerLens adapter: encoding, the OOO readout, reference activations and
position-aware mean ablation, checked against independent hand computations."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_cnn, make_tiny_transformer

from subroutine_circuits.adapters import (
    HookedModuleAdapter,
    TransformerLensAdapter,
    as_adapter,
    register_adapter,
)
from subroutine_circuits.adapters.base import EncodedProblems
from subroutine_circuits.masks import UnitMask


class _Problem:
    def __init__(self, stimuli, odd_index):
        self.stimuli, self.odd_index = stimuli, odd_index


class _Tok:
    """A toy tokenizer: text ``"3 5 7"`` -> ids [1(BOS), 3, 5, 7], right-padded with 0."""

    def encode_batch(self, texts):
        ids = [[1] + [int(w) for w in t.split()] for t in texts]
        n = max(len(i) for i in ids)
        tokens = torch.tensor([i + [0] * (n - len(i)) for i in ids])
        return tokens, torch.tensor([len(i) for i in ids])


def _embed_one(model, ids: list[int]) -> torch.Tensor:
    """Independent readout: the unpadded sequence, ln_final at its last position."""
    resid = model(torch.tensor([ids]), stop_at_layer=model.cfg.n_layers)
    return model.ln_final(resid)[0, -1]


def test_encode_and_ooo_logits_match_hand_computation():
    model = make_tiny_transformer(seed=1)
    adapter = as_adapter(model, tokenizer=_Tok(), pool="last")
    assert isinstance(adapter, TransformerLensAdapter) and as_adapter(adapter) is adapter
    probs = [_Problem(["3 4", "5 6 7 8", "9", "3 4 5"], 1), _Problem(["7 7", "8", "9 9", "2"], 3)]
    enc = adapter.encode_problems(probs)
    assert enc.tokens.shape == (2, 4, 5) and enc.odd.tolist() == [1, 3]
    assert enc.lengths.tolist() == [[3, 5, 2, 4], [3, 2, 3, 2]]
    with torch.no_grad():
        got = adapter.ooo_logits(enc.inputs)
        for b, p in enumerate(probs):
            emb = torch.stack(
                [_embed_one(model, [1] + [int(w) for w in s.split()]) for s in p.stimuli]
            )
            x = F.normalize(emb, dim=-1)
            want = torch.stack(
                [-(x[i] @ x[[j for j in range(4) if j != i]].T).sum() for i in range(4)]
            )
            assert torch.allclose(got[b], want, atol=1e-5)
    assert adapter.accuracy(enc) == float((got.argmax(-1) == enc.odd).float().mean())


def test_position_aware_mean_ablation_matches_hand_hook():
    model = make_tiny_transformer(seed=2)
    adapter = as_adapter(model, pool="last")
    um = adapter.unit_map(kinds=("neuron",), layers=[1])
    name = "blocks.1.mlp.hook_post"
    g = torch.Generator().manual_seed(4)
    ref = torch.randint(2, 50, (5, 7), generator=g)
    lengths = torch.tensor([7, 3, 5, 2, 6])
    _, cache = model.run_with_cache(ref)  # causal: right padding does not change real positions
    acts = cache[name]
    real = torch.arange(7)[None] < lengths[:, None]
    last = torch.arange(7)[None] == (lengths[:, None] - 1)
    mean_ro = acts[last].mean(0)  # [d_mlp] over readout positions
    mean_other = acts[real & ~last].mean(0)
    keep = torch.ones(um.n_units, dtype=torch.bool)
    keep[[0, 5, 9]] = False
    mask = UnitMask.fixed(um, keep, ablation="mean")
    mask.set_mean(adapter, {"tokens": ref, "lengths": lengths}, position_aware=True)
    assert torch.allclose(mask.readout_values[name].reshape(-1), mean_ro, atol=1e-5)
    assert torch.allclose(mask.ablation_values[name].reshape(-1), mean_other, atol=1e-5)
    # a batch of unpadded sequences: the readout position is the last one
    x = torch.randint(2, 50, (3, 4), generator=g)

    def hook(a, hook):
        a = a.clone()
        a[:, :-1, ~keep] = mean_other[~keep]
        a[:, -1, ~keep] = mean_ro[~keep]
        return a

    with torch.no_grad():
        want = model.ln_final(model.run_with_hooks(x, stop_at_layer=2, fwd_hooks=[(name, hook)]))[
            :, -1
        ]
        with mask.applied(model):
            got = adapter.embed({"tokens": x, "lengths": torch.full((3,), 4)})
    assert torch.allclose(got, want, atol=1e-5)
    # default (not position-aware): one mean over all real positions, as before
    plain = UnitMask.fixed(um, keep, ablation="mean")
    plain.set_mean(adapter, {"tokens": ref, "lengths": lengths})
    assert plain.readout_values == {}
    assert torch.allclose(plain.ablation_values[name].reshape(-1), acts[real].mean(0), atol=1e-5)


def test_record_activations_masks_padding_for_bidirectional_models():
    model = make_tiny_transformer(seed=3, attention_dir="bidirectional")
    adapter = as_adapter(model)
    tokens = torch.tensor([[1, 5, 6, 0, 0], [1, 7, 8, 9, 4]])
    rec = adapter.record_activations(
        {"tokens": tokens, "lengths": torch.tensor([3, 5])}, ["blocks.0.attn.hook_z"]
    )
    assert rec.pos_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    alone = model.run_with_cache(tokens[:1, :3])[1]["blocks.0.attn.hook_z"]
    assert torch.allclose(rec.acts["blocks.0.attn.hook_z"][:1, :3], alone, atol=1e-5)


def test_registry_and_generic_adapter():
    cnn = make_tiny_cnn()
    with pytest.raises(ValueError, match="no model adapter for TinyCNN"):
        as_adapter(cnn)
    from subroutine_circuits.masks import UnitGroup, UnitMap

    um = UnitMap([UnitGroup("hook_c2", 1, 6, 1, "channel")])
    register_adapter(lambda m: type(m).__name__ == "TinyCNN", lambda m: HookedModuleAdapter(m, um))
    try:
        adapter = as_adapter(cnn)
        assert isinstance(adapter, HookedModuleAdapter) and adapter.unit_map() == um
        with pytest.raises(ValueError, match="weight_names"):
            adapter.weight_names()
    finally:
        from subroutine_circuits.adapters import base

        base._REGISTRY.pop(0)
    with pytest.raises(ValueError, match="unknown hook"):
        HookedModuleAdapter(cnn, UnitMap([UnitGroup("hook_c9", 1, 6, 1, "channel")]))


def test_encoded_problems_checks_and_pickles():
    with pytest.raises(ValueError, match="leading dims"):
        EncodedProblems({"tokens": torch.zeros(3, 4, 2)}, torch.zeros(2, dtype=torch.long))
    enc = EncodedProblems({"images": torch.zeros(2, 4, 3, 5, 5)}, torch.tensor([0, 3]))
    assert enc.n_stimuli == 4 and enc.flat_inputs()["images"].shape == (8, 3, 5, 5)
    back = pickle.loads(pickle.dumps(enc))
    assert torch.equal(back.odd, enc.odd)
