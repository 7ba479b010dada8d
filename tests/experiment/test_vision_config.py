"""The vision path's configuration: mirrors of torch-side constants, family checks, errors."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from subroutine_circuits.experiment import vision_config as vc
from subroutine_circuits.experiment.config import (
    CNN_UNIT_KINDS,
    ExperimentConfig,
    SimCLRSettings,
    TrainSettings,
    config_from_dict,
    load_config,
)

CNN = {"task": "number_contact", "model": {"family": "cnn", "preset": "cpu"}}


def test_mirrors_match_the_library():
    from subroutine_circuits.adapters.cnn import CNN_UNIT_KINDS as ADAPTER_KINDS
    from subroutine_circuits.models.cnn import CNN_PRESETS, CNNConfig
    from subroutine_circuits.models.cnn_train import CNNTrainConfig
    from subroutine_circuits.tasks.vision import VISION_TASKS

    assert vc.CNN_PRESET_NAMES == tuple(CNN_PRESETS)
    assert vc.VISION_TASKS == VISION_TASKS
    assert CNN_UNIT_KINDS == ADAPTER_KINDS
    cnn_fields = {f.name for f in dataclasses.fields(CNNConfig)}
    assert set(vc.CNN_OVERRIDE_TYPES) | set(vc.CNN_OVERRIDES_REFUSED) == cnn_fields
    hints = typing.get_type_hints(CNNConfig)
    for name, tp in vc.CNN_OVERRIDE_TYPES.items():
        assert tp == hints[name], name
    trainer = {f.name for f in dataclasses.fields(CNNTrainConfig)}
    settings = {f.name for f in dataclasses.fields(TrainSettings)}
    assert set(vc.CNN_TRAIN_KEYS) == trainer & settings


def test_every_train_key_reaches_the_cnn_trainer():
    """The CNN trainer reads every ``[train]`` key (all base-model loops share
    ``models.loop.LoopConfig``), e.g. the learning-rate warm-up."""
    from subroutine_circuits.experiment.vision import cnn_train_config

    cfg = config_from_dict({**CNN, "train": {"warmup_steps": 3, "grad_clip": 0.5}})
    built = cnn_train_config(cfg, seed=1, device="cpu")
    assert (built.warmup_steps, built.grad_clip, built.seed) == (3, 0.5, 1)
    assert set(vc.CNN_TRAIN_KEYS) == {f.name for f in dataclasses.fields(TrainSettings)}


def test_simclr_settings_mirror_simclr_config():
    from subroutine_circuits.models.simclr import SimCLRConfig

    theirs = {f.name for f in dataclasses.fields(SimCLRConfig)}
    ours = {f.name for f in dataclasses.fields(SimCLRSettings)}
    assert ours | set(SimCLRSettings._REFUSED) == theirs
    ours_h, theirs_h = typing.get_type_hints(SimCLRSettings), typing.get_type_hints(SimCLRConfig)
    for f in ours:
        assert ours_h[f] == typing.Optional[theirs_h[f]], f  # noqa: UP045
    built = config_from_dict({**CNN, "simclr": {"max_steps": 5, "temperature": 0.1}}).simclr.build(
        seed=3, device="cpu", progress=False
    )
    assert (built.max_steps, built.temperature, built.seed, built.lr) == (5, 0.1, 3, 5e-4)


def test_cnn_config_defaults_and_round_trip():
    cfg = config_from_dict({**CNN, "model": {**CNN["model"], "image_size": 32,
                                            "overrides": {"stage_widths": [8, 8]}}})  # fmt: skip
    assert cfg.mask.unit_kinds == ("channel", "neuron")  # a CNN's default units
    assert cfg.model.overrides == {"stage_widths": (8, 8)}
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    # text defaults unchanged
    d = ExperimentConfig().to_dict()
    assert d["mask"]["unit_kinds"] == ["head", "neuron"] and d["simclr"] == {}
    assert d["model"]["family"] == "transformer"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"task": "number_contact"}, 'set \\[model\\] family = "cnn"'),
        ({**CNN, "model": {"family": "cnn", "preset": "small"}}, "must be a CNN preset"),
        ({**CNN, "task": "agreement_singular"}, "built-in image task"),
        ({**CNN, "pretrain": {"steps": 3}}, "pretraining is \\[simclr\\]"),
        ({**CNN, "mask": {"unit_kinds": ["head"]}}, "'head' is not a unit kind of a cnn"),
        ({**CNN, "patching_options": {"kinds": ["head"]}}, "patching_options.kinds"),
        ({**CNN, "model": {"family": "cnn", "overrides": {"seed": 1}}}, "base_seeds"),
        ({**CNN, "model": {"family": "cnn", "overrides": {"stage_width": [1]}}},
         "did you mean 'stage_widths'"),
        ({**CNN, "model": {"family": "cnn", "overrides": {"d_hidden": "x"}}},
         "d_hidden must be an integer"),
        ({**CNN, "model": {"family": "cnn", "checkpoint": "x"}}, "build their models"),
        ({**CNN, "simclr": {"augment": {}}}, "augmentations are fixed"),
        ({**CNN, "mask": {"kind": "weight"}, "ablation": "zero"}, "not wired for CNN experiments"),
        ({**CNN, "ablation": "resample"}, "resample.*needs token inputs"),
        ({"model": {"image_size": 32}}, "image_size is for CNNs"),
        ({"simclr": {"max_steps": 3}}, "\\[simclr\\] is for CNNs"),
        ({"data": {"n_train_composite": 3}}, "n_train_composite is for image tasks"),
        ({"mask": {"unit_kinds": ["channel"]}}, "'channel' is not a unit kind of a transformer"),
    ],
)  # fmt: skip
def test_bad_family_settings_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


def test_shipped_vision_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("vision_*.toml"))
    assert paths, "configs/vision_*.toml missing"
    for path in paths:
        cfg = load_config(path)
        assert cfg.model.family == "cnn" and cfg.task in vc.VISION_TASKS


def test_demo_config_is_the_vision_acceptance_setting():
    from subroutine_circuits.experiment.vision import vision_demo_config

    cfg = vision_demo_config()
    assert cfg.task == "number_contact" and cfg.model.image_size == 32
    assert set(cfg.inits) == {"trained", "pretrained", "random_init"}
    assert cfg.patching and set(cfg.patching_methods) >= {"activation", "attribution"}


def test_paper_configs_differ_only_in_task_and_their_grid_fits_the_model():
    from pathlib import Path

    import torch

    from subroutine_circuits.adapters.cnn import CNNAdapter
    from subroutine_circuits.experiment.vision import cnn_model_config
    from subroutine_circuits.models.cnn import HookedCNN, count_params
    from subroutine_circuits.tasks.vision import vision_task

    root = Path(__file__).resolve().parents[2] / "configs"
    cfgs = {p.name: load_config(p) for p in sorted(root.glob("vision_paper*.toml"))}
    assert len(cfgs) == 3 and {c.task for c in cfgs.values()} == set(vc.VISION_TASKS)
    dicts = [{**c.to_dict(), "task": None} for c in cfgs.values()]
    assert all(d == dicts[0] for d in dicts)
    cfg = cfgs["vision_paper.toml"]
    assert cfg.model.image_size == 128 and len(cfg.base_seeds) >= 3 and "pretrained" in cfg.inits
    mcfg = cnn_model_config(cfg, vision_task(cfg.task, image_size=128), 0, "meta")
    with torch.device("meta"):
        adapter = CNNAdapter(HookedCNN(mcfg))
    for point in cfg.mask.grid:
        um = adapter.unit_map(kinds=cfg.mask.unit_kinds, layers=point.get("layers"))
        assert um.hook_names()[-1] == "head.hook_hidden"  # the head's cut is always masked
    assert 2e6 < count_params(mcfg) < 4e6
