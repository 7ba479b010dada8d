"""Saving and loading masks together with the signature of the model they belong to."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from ..utils import atomic_torch_save, saved_class_name
from .parametrization import MaskConfig
from .unit_mask import UnitMask
from .units import UnitMap
from .weight_mask import WeightMask

FORMAT_VERSION = 1
SIGNATURE_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab")


def _module(model: Any) -> nn.Module:
    """The ``nn.Module`` behind a model adapter (or ``model`` itself)."""
    return model.model if hasattr(model, "record_activations") else model


def model_signature(model: nn.Module) -> dict[str, Any]:
    """Essentials of a model's architecture: class name and cfg fields (or hook names).

    For TransformerLens models: ``model_class`` and ``n_layers, d_model, n_heads, d_head, d_mlp,
    d_vocab``. For other ``HookedRootModule`` s (no cfg): ``model_class`` and the sorted hook names.
    """
    if hasattr(model, "signature"):  # a model adapter describes its own model
        return model.signature()
    sig: dict[str, Any] = {"model_class": saved_class_name(model)}
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        for f in SIGNATURE_FIELDS:
            v = getattr(cfg, f, None)
            sig[f] = int(v) if isinstance(v, (int, float)) and v is not None else v
    else:
        sig["hook_names"] = sorted(getattr(model, "hook_dict", {}).keys())
    return sig


def check_signature(saved: dict[str, Any], model: nn.Module) -> None:
    """Raise ValueError naming the first field where ``model`` differs from ``saved``."""
    now = model_signature(model)
    for key in sorted(set(saved) | set(now), key=lambda k: (k != "model_class", k)):
        a, b = saved.get(key), now.get(key)
        if a != b:
            if key == "hook_names":
                raise ValueError("mask was saved for a model with different hook names")
            raise ValueError(f"mask was saved for a model with {key}={a}, this model has {key}={b}")


def save_mask(
    path: str | os.PathLike,
    mask: UnitMask | WeightMask,
    model: nn.Module,
    meta: dict | None = None,
) -> None:
    """Atomically write ``mask`` (state, kind, config, units/params, model signature, meta).

    ``model`` is the model the mask belongs to, or its adapter.
    """
    if isinstance(mask, UnitMask):
        kind = "unit"
        layout: dict[str, Any] = {"unit_map": mask.unit_map.to_dict()}
        extra = {
            "ablation_values": {k: v.cpu() for k, v in mask.ablation_values.items()},
            "readout_values": {k: v.cpu() for k, v in mask.readout_values.items()},
        }
    elif isinstance(mask, WeightMask):
        kind = "weight"
        layout = {"params": mask.shapes_dict()}
        rv = mask.reinit_values
        extra = {
            "reinit_values": None if rv is None else {k: v.cpu() for k, v in rv.items()},
            "init_std": mask.init_std,
        }
    else:
        raise ValueError(f"save_mask expects a UnitMask or WeightMask, got {type(mask).__name__}")
    obj = {
        "format_version": FORMAT_VERSION,
        "mask_kind": kind,
        "config": mask.cfg.to_dict(),
        "fixed": bool(mask.is_fixed),
        "flat_binary": mask.flat_binary(),
        "state_dict": {k: v.detach().cpu() for k, v in mask.state_dict().items()},
        "layout": layout,
        "model_signature": model_signature(model),
        "meta": dict(meta or {}),
        **extra,
    }
    atomic_torch_save(obj, path)


def load_mask(path: str | os.PathLike, model: nn.Module | None = None) -> UnitMask | WeightMask:
    """Load a mask written by :func:`save_mask`.

    The returned mask has ``.meta`` (the saved meta dict) and ``.model_signature``. If ``model``
    is given, its signature must match (ValueError naming the differing field) and the unit map /
    parameter shapes are validated against it. The mask is returned in ``eval()`` mode.
    """
    if not os.path.exists(path):
        raise ValueError(f"mask file {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or "mask_kind" not in obj:
        raise ValueError(f"{str(path)!r} is not a mask file written by save_mask")
    if model is not None:
        check_signature(obj["model_signature"], model)
    cfg = MaskConfig.from_dict(obj["config"])
    fixed = obj["flat_binary"] if obj["fixed"] else None
    if obj["mask_kind"] == "unit":
        unit_map = UnitMap.from_dict(obj["layout"]["unit_map"])
        mask: UnitMask | WeightMask = UnitMask(unit_map, cfg, fixed=fixed)
        mask.load_state_dict(obj["state_dict"])
        mask.ablation_values = dict(obj.get("ablation_values") or {})
        mask.readout_values = dict(obj.get("readout_values") or {})
        if model is not None:
            unit_map.validate(_module(model))
    elif obj["mask_kind"] == "weight":
        shapes = obj["layout"]["params"]
        if model is not None:
            params = dict(_module(model).named_parameters())
            for n, sh in shapes.items():
                if n not in params:
                    raise ValueError(f"mask parameter {n!r} does not exist on this model")
                if list(params[n].shape) != list(sh):
                    raise ValueError(
                        f"mask parameter {n!r} has shape {sh}, this model has "
                        f"{list(params[n].shape)}"
                    )
        mask = WeightMask(
            shapes,
            cfg,
            list(shapes),
            obj.get("reinit_values"),
            fixed=fixed,
            init_std=obj.get("init_std"),
        )
        mask.load_state_dict(obj["state_dict"])
    else:
        raise ValueError(f"unknown mask kind {obj['mask_kind']!r} in {str(path)!r}")
    mask.meta = obj.get("meta", {})
    mask.model_signature = obj["model_signature"]
    mask.eval()
    return mask
