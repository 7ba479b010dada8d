"""Models: transformer presets, readouts (OOO and label token), training, pretraining, checkpoints.

Names are imported lazily (on first attribute access) so that ``import subroutine_circuits.
models`` stays cheap; ``transformer_lens`` itself is imported only inside the functions that
build or load models.
"""

from __future__ import annotations

from subroutine_circuits.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    # presets
    "ModelSpec": "presets",
    "make_model": "presets",
    "PRESETS": "presets",
    "hooked_transformer": "presets",
    # this library's HookedTransformer-compatible model (TransformerLens 4)
    "NativeTransformer": "native",
    "NativeConfig": "native",
    # readouts
    "final_hidden": "readout",
    "ooo_scores": "readout",
    "ooo_logits": "readout",
    "ooo_logits_for_problems": "readout",
    "ooo_accuracy": "readout",
    "encode_problems": "readout",
    "label_logits": "readout",
    "label_logit_diff": "readout",
    "full_logits": "readout",
    "padding_masked": "readout",
    # training
    "TrainConfig": "train",
    "TrainResult": "train",
    "train_ooo": "train",
    "train_label": "train",
    "label_accuracy": "train",
    # pretraining (module ``pretraining``: a submodule named ``pretrain`` would shadow the
    # function ``pretrain`` as a package attribute once imported)
    "PretrainConfig": "pretraining",
    "pretrain": "pretraining",
    "lm_loss": "pretraining",
    "mlm_corrupt": "pretraining",
    # checkpoints
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    # HF loading (written by another engineer)
    "load_hf_checkpoint": "hf",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
