"""GPU defaults: bf16 autocast of the frozen model in mask training, and device-dependent
evaluation batch sizes.

The bf16 tests assert what holds on every CPU (checked on CPU, where torch's bf16 autocast
works too): under autocast the masked activations really are bf16, the mask parameters and
their gradients stay float32 and finite, training returns valid masks, an all-ones mask gives
the model's own bf16 scores, and ``mask.autocast`` reaches the mask engine. How close bf16
masks end up to float32 ones is NOT asserted: that is an outcome of float rounding, which moves
with the CPU's kernels (an ablation difference moved by 0.30 on an AVX2 machine, issue 21), and
a 1e-7 change of the float32 attention softmax alone moves about a quarter of the demo's run
verdicts (docs/RESULTS.md). bf16 stays off by default (docs/SCALING.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_transformer

from subroutine_circuits.experiment import config_from_dict, run_experiment
from subroutine_circuits.utils import autocast_context, autocast_dtype, eval_batch_size

BF16 = torch.bfloat16


def _problems(n: int, pos: int, seed: int):
    """Random OOO problems (``tests/masks/test_batched.make_problems``)."""
    from subroutine_circuits.experiment.search import EncodedProblems

    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, 50, (n, 4, pos), generator=g)
    lens = torch.randint(3, pos + 1, (n, 4), generator=g)
    toks = toks * (torch.arange(pos)[None, None, :] < lens[..., None])
    return EncodedProblems(
        {"tokens": toks, "lengths": lens}, torch.randint(0, 4, (n,), generator=g)
    )


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(seed=3)


def _train(model, dtype, monkeypatch):
    """Two masks trained to convergence under autocast ``dtype`` (None: none); returns the runs,
    the dtypes that reached the masked hook points in training and in validation passes, and
    the mask logits' gradient at every optimiser step."""
    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.experiment import batched
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.converge import mask_schedule, train_masks_converged
    from subroutine_circuits.masks.ablator import reference_ablator

    grads: list[torch.Tensor] = []

    class RecordingAdam(batched.StackedAdam):
        def step(self) -> None:
            grads.append(self.param.grad.detach().clone())
            super().step()

    monkeypatch.setattr(batched, "StackedAdam", RecordingAdam)
    um = tl_unit_map(model)
    abl = reference_ablator(as_adapter(model, pool="last"), um, _problems(16, 9, 5).flat_inputs())
    seen: dict[str, set] = {"train": set(), "eval": set()}  # dtypes at the masked hook points
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a: seen["train" if torch.is_grad_enabled() else "eval"].add(a[0].dtype)
        )
        for name in sorted({g.hook_name for g in um.groups})
    ]
    train, val = _problems(24, 9, seed=1), _problems(12, 9, seed=2)
    cfg = MaskSearchConfig(steps=8, eval_every=4, patience=5, batch_size=6, lr=0.3)
    try:
        sched = mask_schedule(cfg, len(train))
        runs = train_masks_converged(model, train, val, cfg, [{}, {"l0_weight": 4.0}], [0, 1],
                                     sched, abl, "last", autocast_dtype=dtype)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return runs, seen, grads, um, len(val)


@pytest.mark.parametrize("dtype", [BF16, None], ids=["bf16", "none"])
def test_mask_training_under_autocast_runs_bf16_with_float32_masks(model, dtype, monkeypatch):
    """Under bf16 autocast the masked activations are bf16 in training and validation passes
    (float32 without it), the mask logits' gradients are float32 and finite at every step, and
    the runs are valid masks (float32 logits, density = kept fraction, accuracy on the val set)."""
    runs, seen, grads, um, n_val = _train(model, dtype, monkeypatch)
    want = {BF16} if dtype is BF16 else {torch.float32}
    assert seen["train"] == want and seen["eval"] == want  # the masked activations' dtype
    assert grads and len(grads) == max(r.steps for r in runs)
    for g in grads:  # the mask logits and their gradients: float32, finite
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert any(bool(g.abs().gt(0).any()) for g in grads)  # gradients reach the masks
    for r in runs:
        assert all(p.dtype == torch.float32 for p in r.mask.parameters())
        keep = r.mask.flat_binary()
        assert keep.shape == (um.n_units,) and keep.dtype == torch.bool
        assert r.density == pytest.approx(keep.float().mean().item())
        assert 0.0 <= r.val_acc <= 1.0 and math.isclose(r.val_acc * n_val, round(r.val_acc * n_val))
        assert 1 <= r.steps <= 8 and 0 <= r.best_step <= r.steps


def test_all_ones_mask_under_bf16_is_the_model_under_bf16(model):
    """A mask keeping every unit adds nothing to the bf16 forward pass: its scores are the
    model's own under the same autocast (and those are bf16 roundings of the float32 ones)."""
    from subroutine_circuits.adapters import tl_unit_map
    from subroutine_circuits.experiment.batched import fixed_mask_scores
    from subroutine_circuits.models import ooo_logits

    data = _problems(40, 9, seed=3)
    um = tl_unit_map(model)
    keep = torch.ones(1, um.n_units, dtype=torch.bool)
    with torch.no_grad():
        f32 = ooo_logits(model, data.tokens, data.lengths, "last")
        with autocast_context("cpu", "bf16"):
            own = ooo_logits(model, data.tokens, data.lengths, "last")
        got = fixed_mask_scores(model, data, keep, "last", unit_map=um, autocast_dtype=BF16)[0]
    assert f32.dtype == torch.float32 and own.dtype == BF16
    scale = float(f32.abs().max())
    torch.testing.assert_close(got, own.float(), rtol=0, atol=2**-8 * scale)  # < 1 bf16 ulp
    # bf16 computes the same function: within a few percent of the scores' scale (a 2-layer
    # model; bf16 keeps 8 significant bits), not an outcome-sized difference
    assert (own.float() - f32).abs().max() <= 0.05 * scale


def _config(autocast: str):
    """One briefly trained base model, two mask seeds (the plumbing, not the outcome)."""
    return config_from_dict(
        {
            "task": "agreement_singular",
            "inits": ["trained"],
            "base_seeds": [0],
            "mask_seeds": [0, 1],
            "min_composite_acc": 0.0,
            "patching": False,
            "device": "cpu",
            "data": {"n_train": 100, "n_val": 40, "n_test": 40},
            "train": {"max_steps": 30, "eval_every": 15},
            "mask": {
                "steps": 10,
                "lr": 0.1,
                "init": 1.0,
                "grid": [{"l0_weight": 1.0}],
                "autocast": autocast,
            },
        }  # fmt: skip
    )


def test_mask_autocast_setting_reaches_the_mask_engine(tmp_path, monkeypatch):
    """``mask.autocast = "bf16"`` trains every mask under bf16 autocast and the run completes
    with valid results and loadable float32 masks."""
    import subroutine_circuits.report
    from subroutine_circuits.experiment import converge
    from subroutine_circuits.masks import load_mask

    monkeypatch.setattr(subroutine_circuits.report, "build_report", lambda out: None)
    used = []
    real = converge.train_masks_converged

    def recording(*args, **kwargs):
        used.append(kwargs.get("autocast_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(converge, "train_masks_converged", recording)
    got = run_experiment(_config("bf16"), tmp_path / "bf16", progress=False)
    assert used and set(used) == {BF16}
    assert len(got) == 4  # 2 subroutines x 2 mask seeds
    assert got["density"].between(0, 1).all()
    for col in ("mask_val_acc", "sub_target_acc", "abl_target_acc"):
        assert got[col].between(0, 1).all(), col
    for path in got["mask_path"]:
        mask = load_mask(tmp_path / "bf16" / path)
        assert all(p.dtype == torch.float32 for p in mask.parameters())


def test_autocast_modes_and_eval_batch_sizes():
    assert autocast_dtype("none") is None and autocast_dtype(None) is None
    assert autocast_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown autocast mode 'fp8'"):
        autocast_dtype("fp8")
    lin = torch.nn.Linear(4, 4)
    with autocast_context("cpu", "bf16"):
        assert lin(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), "none"):
        assert lin(torch.ones(2, 4)).dtype == torch.float32
    assert eval_batch_size("cpu") == 256
    assert eval_batch_size(torch.device("cuda", 1)) == eval_batch_size("cuda") > 256
    with pytest.raises(ValueError, match="mask.autocast must be one of"):
        config_from_dict({"mask": {"autocast": "fp16"}})
