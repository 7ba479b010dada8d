"""Fixed-mask evaluation runs the last block at the readout position only
(``NativeTransformer.readout_residual``): the scores of the pass over every position."""

from __future__ import annotations

import pytest
import torch
from test_verdicts import random_test_split

from subroutine_circuits.adapters import as_adapter, padded, tl_unit_map
from subroutine_circuits.experiment import batched
from subroutine_circuits.masks.ablator import reference_ablator
from subroutine_circuits.models.readout import pool_positions


def _native(n_layers: int = 2, attention: str = "causal"):
    from subroutine_circuits.models.presets import hooked_transformer

    return hooked_transformer(backend="native", n_layers=n_layers, d_model=32, n_heads=4,
                              d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, act_fn="gelu",
                              normalization_type="LN", attention_dir=attention, seed=3,
                              device="cpu").double()  # fmt: skip


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_readout_residual_is_the_full_pass_at_the_readout(attention, n_layers):
    """Against the full forward pass, ``ln_final`` and the last-token gather (padded keys
    masked by the same hooks); the last block's hooks after k and v see one position."""
    model = _native(n_layers, attention)
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(1, 50, (9, 11), generator=g)
    lengths = torch.tensor([11, 3, 5, 1, 11, 2, 6, 8, 10])
    state = {"pad": torch.arange(11)[None, :] >= lengths[:, None]}
    shapes: dict[str, tuple[int, ...]] = {}

    def seen(x, hook):
        shapes[hook.name] = tuple(x.shape)

    last = f"blocks.{n_layers - 1}."
    spy = [(f"{last}attn.hook_z", seen), (f"{last}attn.hook_k", seen), (f"{last}mlp.hook_post",
                                                                         seen)]  # fmt: skip
    with torch.no_grad(), model.hooks(fwd_hooks=padded.padding_hooks(model, state)):
        full = model.ln_final(model(tok, stop_at_layer=n_layers))
        want = pool_positions(full, lengths, "last")
        with model.hooks(fwd_hooks=spy):
            got = model.readout_residual(tok, lengths - 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert shapes[f"{last}attn.hook_z"] == (9, 1, 4, 8)
    assert shapes[f"{last}mlp.hook_post"] == (9, 1, 64)
    assert shapes[f"{last}attn.hook_k"] == (9, 11, 4, 8)
    assert f"{last}attn.hook_z" in model.readout_hook_names()
    assert f"{last}attn.hook_k" not in model.readout_hook_names()


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_fixed_scores_equal_the_every_position_pass(ablation, monkeypatch):
    """Random keep masks over heads and neurons of both layers, several problem chunks and mask
    passes: the same answers and scores (float64) as passes over every position; resample
    ablation, whose sources are aligned position by position, keeps the full pass."""
    model = _native()
    g = torch.Generator().manual_seed(0)
    data = random_test_split(g)["partition_a"]
    um = tl_unit_map(model)
    keep = torch.rand(7, um.n_units, generator=g) < 0.6
    adapter = as_adapter(model, pool="last")

    def run():  # a fresh ablator per call: resample draws from its own generator
        abl = reference_ablator(adapter, um, data.flat_inputs(), ablation, seed=0)
        return batched.fixed_mask_scores(model, data, keep, "last", unit_map=um, ablator=abl,
                                         max_rows=16)  # fmt: skip

    calls = []
    real = type(model).readout_residual

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(type(model), "readout_residual", counting)
    fast = run()
    assert bool(calls) == (ablation != "resample")
    monkeypatch.setattr(padded, "readout_hook_names", lambda *a: None)  # every position
    slow = run()
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_mask_training_equals_the_every_position_pass(ablation, monkeypatch):
    """Converged batched mask training whose passes run the last block at the readout position
    only trains the masks of passes over every position (float64 model): same steps, best
    steps, kept units, validation accuracies."""
    from test_memory import _problems

    from subroutine_circuits.experiment import converge
    from subroutine_circuits.experiment.config import MaskSearchConfig

    model = _native()
    adapter = as_adapter(model, pool="last")
    um = tl_unit_map(model)
    train = [_problems(24, 9, seed=1), _problems(20, 9, seed=2, min_len=4)]
    val = [_problems(12, 9, seed=3), _problems(12, 9, seed=4)]
    cfg = MaskSearchConfig(steps=12, eval_every=3, patience=2, batch_size=5, lr=0.3,
                           min_density_drop=0.0)  # fmt: skip
    sched = converge.mask_schedule(cfg, 24)
    hps = [{"l0_weight": 0.0}, {"l0_weight": 30.0}, {"l0_weight": 3.0}]

    def train_all():
        abl = reference_ablator(adapter, um, _problems(16, 9, seed=5).flat_inputs(), ablation, 7)
        return converge.train_masks_converged(model, train, val, cfg, hps, [0, 1, 2], sched,
                                              abl, "last", data_index=[0, 1, 1],
                                              noise="exact")  # fmt: skip

    calls = []
    real = type(model).readout_residual

    def counting(self, *a, **k):
        calls.append(torch.is_grad_enabled())
        return real(self, *a, **k)

    monkeypatch.setattr(type(model), "readout_residual", counting)
    fast = train_all()
    assert any(calls)  # the training passes (with gradients) ran at the readout only
    monkeypatch.setattr(padded, "readout_hook_names", lambda *a: None)  # every position
    slow = train_all()
    for f, s in zip(fast, slow):
        assert (f.steps, f.best_step) == (s.steps, s.best_step)
        assert f.val_acc == pytest.approx(s.val_acc)
        assert torch.equal(f.mask.flat_binary(), s.mask.flat_binary())
        fs, ss = f.mask.state_dict(), s.mask.state_dict()
        assert fs.keys() == ss.keys()
        for name in fs:
            torch.testing.assert_close(fs[name], ss[name], rtol=1e-5, atol=1e-6)
