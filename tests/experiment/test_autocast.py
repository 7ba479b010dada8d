"""GPU defaults: bf16 autocast of the frozen model in mask training stays close to float32
(checked on CPU, where torch's bf16 autocast works too; verdicts can move, so it is off by
default), and device-dependent evaluation batch sizes."""

from __future__ import annotations

import shutil

import pytest
import torch

from subroutine_circuits.experiment import config_from_dict, run_experiment
from subroutine_circuits.utils import autocast_context, autocast_dtype, eval_batch_size


def _config(autocast: str):
    """One trained base model good enough to show the pattern, two mask seeds."""
    return config_from_dict(
        {
            "task": "agreement_singular",
            "inits": ["trained"],
            "base_seeds": [0],
            "mask_seeds": [0, 1],
            "min_composite_acc": 0.0,
            "patching": False,
            "device": "cpu",
            "data": {"n_train": 200, "n_val": 60, "n_test": 80},
            "train": {"max_steps": 300, "eval_every": 50},
            "mask": {
                "steps": 100,
                "lr": 0.1,
                "init": 1.0,
                "grid": [{"l0_weight": 1.0}],
                "autocast": autocast,
            },
        }  # fmt: skip
    )


def _kept(path) -> torch.Tensor:
    from subroutine_circuits.masks import load_mask

    return load_mask(path).flat_binary().bool()


def test_bf16_autocast_mask_training_stays_close_to_float32(tmp_path, monkeypatch):
    """Masks trained under bf16 autocast (same base model, copied) keep nearly the same units
    and, on the runs whose search succeeded, ablation differences within 0.1 of float32 ones.

    Verdicts are NOT asserted equal: on this config bf16 changed 2 of 4 (randabl_p 0.025 ->
    0.175 / 0.075 on the verb runs), and a 1e-7 change of the float32 attention softmax alone
    moves about a quarter of the demo's run verdicts (docs/RESULTS.md), so equal verdicts were
    luck. bf16 stays off by default (docs/SCALING.md)."""
    import subroutine_circuits.report

    monkeypatch.setattr(subroutine_circuits.report, "build_report", lambda out: None)
    ref = run_experiment(_config("none"), tmp_path / "fp32", progress=False)
    shutil.copytree(tmp_path / "fp32" / "models", tmp_path / "bf16" / "models")
    got = run_experiment(_config("bf16"), tmp_path / "bf16", progress=False)
    assert len(ref) == len(got) == 4
    assert ref["mask_ok"].any()  # usable runs: verdicts that could have flipped
    usable = ref["mask_ok"].to_numpy()
    for col in ("sub_diff", "abl_diff"):
        assert (ref[col] - got[col])[usable].abs().max() < 0.1, col
    assert (ref["density"] - got["density"]).abs().max() < 0.1

    def jac(a, b):
        return (a & b).sum().item() / max(1, (a | b).sum().item())

    fp32 = [_kept(tmp_path / "fp32" / a) for a in ref["mask_path"]]
    bf16 = [_kept(tmp_path / "bf16" / b) for b in got["mask_path"]]
    # the reference for "nearly the same units": two float32 mask seeds of one subroutine
    # (rows 0/1 and 2/3 are the two seeds of each subroutine)
    seed_to_seed = min(jac(fp32[0], fp32[1]), jac(fp32[2], fp32[3]))
    for a, b in zip(fp32, bf16):
        assert jac(a, b) >= seed_to_seed - 0.05, (jac(a, b), seed_to_seed)
    # and bf16 really ran: the masks are not bit-identical to the float32 ones
    assert not ref[["sub_target_acc", "abl_target_acc", "density"]].equals(
        got[["sub_target_acc", "abl_target_acc", "density"]]
    )


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
