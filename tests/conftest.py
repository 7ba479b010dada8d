"""Shared fixtures: tiny TransformerLens models built from configs (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

# Tiny models run much faster on one thread than on several competing ones (and CI has 2 cores).
torch.set_num_threads(1)


def make_tiny_transformer(seed: int = 0, attention_dir: str = "causal", d_vocab: int = 50):
    """A 2-layer, d_model 32, 4-head HookedTransformer with random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=d_vocab,
        n_ctx=16,
        act_fn="gelu",
        normalization_type="LN",
        attention_dir=attention_dir,
        seed=seed,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


@pytest.fixture
def tiny_model():
    """A tiny causal HookedTransformer (fresh per test)."""
    torch.manual_seed(0)
    return make_tiny_transformer()


@pytest.fixture
def tiny_tokens():
    """A batch of random token ids for the tiny model: [batch 6, pos 10]."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 50, (6, 10), generator=g)
