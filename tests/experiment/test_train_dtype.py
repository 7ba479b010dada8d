"""``model.train_dtype``: base models trained in float64 are stored and studied in float32, and
float rounding of other kernels no longer moves them (issue 22, verdict stability)."""

from __future__ import annotations

import pytest
import torch

from subroutine_circuits.experiment import config_from_dict
from subroutine_circuits.experiment.data import prepare
from subroutine_circuits.experiment.stages import build_base_model


def _cfg(dtype: str):
    return config_from_dict({
        "task": "agreement_singular",
        "base_seeds": [0],
        "model": {"train_dtype": dtype},
        "data": {"n_train": 120, "n_val": 40, "n_test": 40, "corpus_size": 120},
        "train": {"max_steps": 60, "eval_every": 30},
        "pretrain": {"steps": 30},
    })  # fmt: skip


def _perturbed_softmax(monkeypatch) -> None:
    """Route the attention softmax of either TransformerLens through ``exp(x - max) / sum``
    computed in another order: the same function, other float rounding (a stand-in for another
    CPU's kernels)."""
    from subroutine_circuits.models import cpu_kernels

    def softmax(x, dim=-1, **kw):
        e = (x - x.amax(dim, keepdim=True)).exp()
        return e * (1.0 / e.sum(dim, keepdim=True))

    monkeypatch.setattr(cpu_kernels, "softmax_lastdim", lambda x: softmax(x))


def _weights(init: str, dtype: str) -> dict[str, torch.Tensor]:
    from subroutine_circuits.models.cpu_kernels import fast_cpu_attention

    cfg = _cfg(dtype)
    prep = prepare(cfg)
    with fast_cpu_attention():
        model, meta = build_base_model(cfg, prep, init, 0, "cpu")
    params = dict(model.state_dict())
    assert all(v.dtype == torch.float32 for v in params.values() if v.is_floating_point())
    assert meta.get("train_dtype", "float32") == (dtype if init != "random_init" else "float32")
    return {k: v.clone() for k, v in params.items() if v.is_floating_point()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel())


@pytest.mark.parametrize("init", ["trained", "pretrained"])
def test_float64_training_is_stored_in_float32_and_robust_to_rounding(init, monkeypatch):
    """Pretraining and training in float64: the model comes back in float32 (every floating
    tensor), and a softmax of other float rounding changes the trained weights by far less
    than float32 training lets it (float64 rounding is about 1e-16, not 1e-7)."""
    reference = _weights(init, "float64")
    with monkeypatch.context() as m:
        _perturbed_softmax(m)
        perturbed = _weights(init, "float64")
    assert _max_diff(reference, perturbed) < 1e-5


def test_random_init_is_not_cast():
    """A random-init base model is never trained: it is the float32 preset, bit for bit."""
    assert _max_diff(_weights("random_init", "float32"), _weights("random_init", "float64")) == 0


def test_train_dtype_refused_for_a_hugging_face_folder(tmp_path):
    """A Hugging Face folder trains in its own precision: float64 is refused by name."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="train_dtype"):
        config_from_dict({"model": {"checkpoint": str(tmp_path), "train_dtype": "float64"}})
