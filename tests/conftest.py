"""Shared fixtures: tiny TransformerLens models built from configs (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

# Tiny models run much faster on one thread than on several competing ones (and CI has 2 cores).
torch.set_num_threads(1)


def make_tiny_transformer(seed: int = 0, attention_dir: str = "causal", d_vocab: int = 50):
    """A 2-layer, d_model 32, 4-head HookedTransformer with random weights (TransformerLens' on
    3.x, ``NativeTransformer`` on 4.x)."""
    from subroutine_circuits.models.presets import hooked_transformer

    return hooked_transformer(
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


def logit_diff_metric(logits):
    """A per-example metric for the tiny transformer: logit 4 minus logit 7 at the last
    position."""
    return logits[..., -1, 4] - logits[..., -1, 7]


def corrupted_batch(tokens):
    """A ``PatchBatch`` of ``tokens`` and a corruption of positions 1 and 8, with
    :func:`logit_diff_metric`."""
    from subroutine_circuits.patching.circuits import PatchBatch

    corr = tokens.clone()
    corr[:, 1] = (corr[:, 1] + 5) % 50
    corr[:, 8] = (corr[:, 8] + 3) % 50
    return PatchBatch(tokens, corr, logit_diff_metric)


def make_tiny_cnn():
    """A 2-conv ``HookedRootModule`` (channels at ``hook_c1`` [n, 5, h, w] and ``hook_c2``
    [n, 6, h, w]) with a linear head; inputs ``[n, 2, H, W]``. Stands in for a CNN family."""
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.HookedRootModule import HookedRootModule

    class TinyCNN(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(2, 5, 3, padding=1)
            self.hook_c1 = HookPoint()
            self.conv2 = torch.nn.Conv2d(5, 6, 3, padding=1)
            self.hook_c2 = HookPoint()
            self.head = torch.nn.Linear(6, 3)
            self.setup()

        def forward(self, x):
            x = self.hook_c1(torch.relu(self.conv1(x)))
            x = self.hook_c2(torch.relu(self.conv2(x)))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return TinyCNN().eval()


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
