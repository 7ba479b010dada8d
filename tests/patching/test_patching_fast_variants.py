"""Every fast-path variant equals TransformerLens' per-position head patching; the packed index
and the identical-activation shortcut do what they say."""

from __future__ import annotations

import pytest
import torch
from test_patching_activation import _logit_diff, _make_model, _mean_over_pos_diff, _tl_by_pos

from subroutine_circuits.adapters import tl_unit_map
from subroutine_circuits.patching.activation import activation_patching
from subroutine_circuits.patching.fast_forward import FAST_VARIANTS, resolve_fast_variant
from subroutine_circuits.patching.fast_packed import packed_indexes


def _tokens(n_pos: int, batch: int = 5, corrupt: tuple[int, ...] = (3,), seed: int = 0):
    """Random clean tokens and a corrupted copy differing at the ``corrupt`` positions."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50, (batch, n_pos), generator=g)
    corr = clean.clone()
    for p in corrupt:
        corr[:, p] = (corr[:, p] + 13) % 50
    return clean, corr


@pytest.mark.parametrize("variant", sorted(FAST_VARIANTS))
@pytest.mark.parametrize(
    "norm, n_layers, n_pos, metric, chunk_rows",
    [
        ("LN", 3, 7, _logit_diff, 12),  # chunks of 2 patches: cut inside a position
        ("LNPre", 3, 6, _mean_over_pos_diff, 17),  # full logits, 3 patches per chunk
        ("RMS", 2, 5, _mean_over_pos_diff, 4096),  # one chunk per layer
    ],
)
def test_variant_equals_transformer_lens(variant, norm, n_layers, n_pos, metric, chunk_rows):
    model = _make_model(norm, "gelu", n_layers, seed=n_pos)
    clean, corr = _tokens(n_pos, corrupt=(1, n_pos - 2), seed=n_pos)
    groups = tl_unit_map(model, kinds=("head",)).groups
    expected = _tl_by_pos(model, clean, corr, metric).cpu()
    res = activation_patching(
        model, clean, corr, metric, groups, per_position=True, chunk_rows=chunk_rows, fast=variant
    )
    assert res.extra["variant"] == variant
    assert res.extra["path"] == ("fast-last" if metric is _logit_diff else "fast-suffix")
    assert (res.layer_grid("head") - expected).abs().max() <= 1e-4
    assert (expected - res.corr_metric).abs().max() > 1e-3  # the patches move the metric


@pytest.mark.parametrize("variant", ["packed", "packed-sdpa"])
def test_packed_hidden_readout_and_layer_subset(variant):
    model = _make_model("LN", "relu", 3, seed=8)
    clean, corr = _tokens(6, corrupt=(2,), seed=1)
    groups = tl_unit_map(model, kinds=("head",), layers=[2, 0]).groups  # unsorted subset
    w = torch.randn(32, generator=torch.Generator().manual_seed(0))

    def metric(hidden):  # [..., batch, d_model] -> [..., batch]
        return hidden @ w

    kw = dict(per_position=True, readout="hidden_last", chunk_rows=9)
    fast = activation_patching(model, clean, corr, metric, groups, fast=variant, **kw)
    generic = activation_patching(model, clean, corr, metric, groups, fast=False, **kw)
    assert fast.extra["path"] == "fast-last"
    assert set(fast.patched) == {"blocks.0.attn.hook_z", "blocks.2.attn.hook_z"}
    for hook, grid in generic.patched.items():
        assert (fast.patched[hook] - grid).abs().max() <= 1e-4
    assert (generic.patched["blocks.0.attn.hook_z"] - generic.corr_metric).abs().max() > 1e-3


def test_identical_activations_keep_the_corrupted_metric():
    """Before the first corrupted position clean and corrupted z are equal (causal model): the
    skipping variants do not compute those patches (exactly the corrupted metric); computing
    them anyway gives the same numbers."""
    model = _make_model("LN", "gelu", 2, seed=4)
    clean, corr = _tokens(8, corrupt=(4,), seed=2)
    groups = tl_unit_map(model, kinds=("head",)).groups
    kw = dict(per_position=True, chunk_rows=10)
    skip = activation_patching(model, clean, corr, _mean_over_pos_diff, groups, fast="packed", **kw)
    full = activation_patching(
        model, clean, corr, _mean_over_pos_diff, groups, fast="packed-noskip", **kw
    )
    pos_skip = activation_patching(
        model, clean, corr, _mean_over_pos_diff, groups, fast="positions-skip", **kw
    )
    grid_skip, grid_full = skip.layer_grid("head"), full.layer_grid("head")
    assert torch.all(grid_skip[:, :4] == skip.corr_metric)
    assert torch.all(pos_skip.layer_grid("head")[:, :4] == skip.corr_metric)
    assert (pos_skip.layer_grid("head") - grid_full).abs().max() <= 1e-5
    assert (grid_full[:, :4] - full.corr_metric).abs().max() <= 1e-5
    assert (grid_skip - grid_full).abs().max() <= 1e-5
    assert (grid_skip[:, 4:] - skip.corr_metric).abs().max() > 1e-3


def test_packed_index_layout():
    items = [(5, 1), (2, 0), (2, 3)]  # (position, head)
    batch, n_pos = 2, 7
    (ix,) = packed_indexes([items], batch, n_pos, "cpu")
    assert ix.k == 3 and ix.q_from == 2
    assert ix.b_row.tolist() == [0, 1] * 3
    assert ix.p_row.tolist() == [5, 5, 2, 2, 2, 2]
    assert ix.h_row.tolist() == [1, 1, 0, 0, 3, 3]
    # row r holds positions p_r .. n_pos - 1, consecutively
    lens = [n_pos - p for p in ix.p_row.tolist()]
    assert ix.row_tok.tolist() == [r for r, n in enumerate(lens) for _ in range(n)]
    for r in range(6):
        toks = (ix.row_tok == r).nonzero().flatten()
        assert ix.pos_tok[toks].tolist() == list(range(int(ix.p_row[r]), n_pos))
        assert int(ix.first_tok[r]) == int(toks[0]) and int(ix.last_tok[r]) == int(toks[-1])
    assert torch.equal(ix.flat_tok, ix.row_tok * n_pos + ix.pos_tok)
    assert torch.equal(ix.src_tok, ix.b_row[ix.row_tok] * n_pos + ix.pos_tok)
    assert torch.equal(ix.qpos_tok, ix.pos_tok - 2)
    assert torch.equal(ix.src_first, ix.b_row * n_pos + ix.p_row)
    assert packed_indexes([], batch, n_pos, "cpu") == []


def test_unknown_variant_is_rejected(tiny_model, tiny_tokens):
    groups = tl_unit_map(tiny_model, kinds=("head",)).groups
    with pytest.raises(ValueError, match="unknown fast-path variant 'fastest'"):
        activation_patching(
            tiny_model, tiny_tokens, tiny_tokens, _logit_diff, groups, per_position=True,
            fast="fastest",
        )  # fmt: skip
    assert resolve_fast_variant("auto", torch.device("cpu")) in FAST_VARIANTS.values()
