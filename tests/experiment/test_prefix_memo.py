"""Fixed-mask evaluation reuses layer 0's attention across masks (models.native.PrefixMemo):
the same scores, bit for bit, as computing it in every pass."""

from __future__ import annotations

import pytest
import torch
from test_verdicts import random_test_split

from subroutine_circuits.adapters import as_adapter, tl_unit_map
from subroutine_circuits.experiment.batched import fixed_mask_scores
from subroutine_circuits.masks.ablator import reference_ablator


def _model_with_memo():
    """The conftest's tiny model as this library's NativeTransformer (the model with a prefix
    memo) on either TransformerLens."""
    from subroutine_circuits.models.presets import hooked_transformer

    model = hooked_transformer(backend="native", n_layers=2, d_model=32, n_heads=4, d_head=8,
                               d_mlp=64, d_vocab=50, n_ctx=16, act_fn="gelu",
                               normalization_type="LN", attention_dir="causal", seed=3,
                               device="cpu")  # fmt: skip
    assert callable(model.prefix_memo)
    return model


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_scores_equal_with_and_without_the_memo(ablation, monkeypatch):
    """Random keep masks over heads and neurons of both layers, small chunks (several problem
    chunks, several mask passes each): identical scores, and the memo was used."""
    from subroutine_circuits.models import native

    model = _model_with_memo()
    g = torch.Generator().manual_seed(0)
    data = random_test_split(g)["partition_a"]
    um = tl_unit_map(model)
    keep = torch.rand(7, um.n_units, generator=g) < 0.6
    adapter = as_adapter(model, pool="last")

    def abl():  # a fresh one per call: resample draws its sources from its own generator
        return reference_ablator(adapter, um, data.flat_inputs(), ablation, seed=0)

    hits = []
    real = native.PrefixMemo.lookup

    def counting(self, x):
        z = real(self, x)
        hits.append(z is not None)
        return z

    monkeypatch.setattr(native.PrefixMemo, "lookup", counting)
    with_memo = fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl(),
                                  max_rows=16)  # fmt: skip
    assert any(hits)
    model.prefix_memo = None  # the instance attribute hides the method: no memo
    without = fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl(),
                                max_rows=16)  # fmt: skip
    assert torch.equal(with_memo, without)


def test_memo_refuses_other_inputs_and_gradients():
    """Another input is recomputed (exact comparison), so is any pass with autograd on."""
    model = _model_with_memo()
    tokens = torch.randint(1, 50, (6, 9), generator=torch.Generator().manual_seed(1))
    other = tokens.flip(0)
    with torch.no_grad():
        ref_a, ref_b = model(tokens), model(other)
    with model.prefix_memo() as memo, torch.no_grad():
        a, b, a2 = model(tokens), model(other), model(tokens.repeat(2, 1))
    assert memo.hits == 1  # only the repeat of a stored input
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b) and torch.equal(a2[:6], ref_a)
    with model.prefix_memo() as memo:
        model(tokens)
        model(tokens)
    assert memo.hits == 0 and not memo.entries
