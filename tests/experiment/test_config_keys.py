"""The typed config tree: every key at every level is checked when a config is loaded."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from subroutine_circuits.experiment.config import (
    MODEL_OVERRIDE_TYPES,
    MODEL_OVERRIDES_REFUSED,
    ExperimentConfig,
    MaskGridPoint,
    MaskSearchConfig,
    PatchingOptions,
    PretrainSettings,
    TrainSettings,
    config_from_dict,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]

# (where the typo goes, the TOML text, the key the error must name, the table it must name)
TYPOS = [
    ("top level", 'task = "agreement_singular"\nmask_sedes = [0]\n', "mask_sedes", "top level"),
    ("[mask]", "[mask]\nstepz = 10\n", "stepz", "[mask]"),
    ("mask.grid entry", "[mask]\ngrid = [{ l0_weight = 1.0 }, { l0_wieght = 2.0 }]\n",
     "l0_wieght", "[mask.grid[1]]"),
    ("[[mask.grid]]", "[[mask.grid]]\nlr = 0.1\nlayerz = [0]\n", "layerz", "[mask.grid[0]]"),
    ("[train]", "[train]\nmax_step = 5\n", "max_step", "[train]"),
    ("[pretrain]", "[pretrain]\nmask_probability = 0.2\n", "mask_probability", "[pretrain]"),
    ("[data]", "[data]\nn_tran = 5\n", "n_tran", "[data]"),
    ("[model]", "[model]\npresett = 'tiny'\n", "presett", "[model]"),
    ("[model.overrides]", "[model.overrides]\nn_layer = 3\n", "n_layer", "[model.overrides]"),
    ("[patching_options]", "[patching_options]\nig_stepz = 3\n", "ig_stepz",
     "[patching_options]"),
]  # fmt: skip


@pytest.mark.parametrize("where,text,key,table", TYPOS, ids=[t[0] for t in TYPOS])
def test_cli_refuses_unknown_key_before_any_work(tmp_path, where, text, key, table):
    """``python -m subroutine_circuits run CONFIG --out D`` with a typo anywhere exits non-zero
    within seconds, names the key and its table, and creates nothing under D."""
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "subroutine_circuits", "run", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode != 0, proc.stdout
    assert f"unknown key {key!r}" in proc.stderr, proc.stderr
    assert table in proc.stderr, proc.stderr
    assert str(config) in proc.stderr  # the file is named too
    assert not out.exists()  # no models/ folder, no manifest: nothing ran
    assert seconds < 60, seconds  # generous on a loaded machine; typically well under 1 s


def test_loading_a_config_imports_neither_torch_nor_transformer_lens(tmp_path):
    """Validation is cheap: a fresh interpreter loads and checks every example config, and a
    failing CLI call, without importing torch or TransformerLens."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_step = 5\n")
    code = (
        "import sys, glob\n"
        "from subroutine_circuits.experiment.config import load_config\n"
        f"for f in sorted(glob.glob({str(ROOT / 'configs' / '*.toml')!r})): load_config(f)\n"
        "from subroutine_circuits.cli import main\n"
        f"rc = main(['run', {str(bad)!r}, '--out', {str(tmp_path / 'o')!r}])\n"
        "print(rc, 'torch' in sys.modules, 'transformer_lens' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"mask": {"grid": [{"lr": 0.1}, {"lr": "x"}]}},
            "mask.grid[1].lr must be a number, got 'x'",
        ),
        ({"mask": {"grid": [{"steps": 4}]}}, "key 'steps' is not allowed in [mask.grid[0]]"),
        ({"mask": {"epochs": 0}}, "mask.epochs must be > 0, got 0"),
        ({"mask": {"steps": 2.5}}, "mask.steps must be an integer, got 2.5"),
        ({"n_random": 19}, "n_random must be >= 20, got 19"),
        ({"mask_min_acc": 1.5}, "mask_min_acc must be <= 1, got 1.5"),
        ({"model": {"pool": "mean"}}, "model.pool = 'mean' lets every word's own embedding"),
        ({"mask": {"kind": "weight"}}, "set ablation = 'zero' for mask.kind = 'weight'"),
        ({"mask": {"grid": [{"layers": [0, "a"]}]}}, "mask.grid[0].layers[1] must be an integer"),
        ({"mask": {"grid": [{"l0_weight": -1}]}}, "mask.grid[0].l0_weight must be >= 0, got -1"),
        ({"mask": {"grid": {"lr": 0.1}}}, "mask.grid must be a list of tables"),
        ({"mask": {"grid": [3]}}, "[mask.grid[0]] must be a table, got 3"),
        ({"mask": {"kind": "units"}}, "mask.kind must be one of ['unit', 'weight'], got 'units'"),
        ({"mask": {"unit_kinds": ["head", "nueron"]}}, "mask.unit_kinds[1] must be one of"),
        ({"mask": {"parametrization": "sigmoid"}}, "mask.parametrization must be one of"),
        ({"mask": 3}, "[mask] must be a table, got 3"),
        ({"train": {"max_steps": "100"}}, "train.max_steps must be an integer, got '100'"),
        ({"train": {"lr": 0}}, "train.lr must be > 0, got 0"),
        ({"train": {"seed": 1}}, "key 'seed' is not allowed in [train]"),
        ({"train": {"device": "cuda"}}, "key 'device' is not allowed in [train]"),
        ({"train": {"pool": "mean"}}, "key 'pool' is not allowed in [train]: set [model] pool"),
        ({"pretrain": {"objective": "lm"}}, "pretrain.objective must be one of"),
        ({"pretrain": {"mask_prob": 1.5}}, "pretrain.mask_prob must be <= 1, got 1.5"),
        ({"pretrain": {"progress": True}}, "key 'progress' is not allowed in [pretrain]"),
        ({"data": {"n_train": 0}}, "data.n_train must be >= 1, got 0"),
        ({"data": {"seed": True}}, "data.seed must be an integer, got True"),
        ({"model": {"attention": "both"}}, "model.attention must be one of"),
        ({"model": {"preset": "huge"}}, "model.preset must be one of"),
        ({"model": {"train_dtype": "float16"}}, "model.train_dtype must be one of"),
        ({"model": {"family": "cnn", "train_dtype": "float64"}}, "CNNs train in float32"),
        ({"model": {"overrides": {"n_layers": "3"}}}, "model.overrides.n_layers must be an int"),
        ({"model": {"overrides": {"n_heads": 0}}}, "model.overrides.n_heads must be >= 1"),
        ({"model": {"overrides": {"d_vocab": 9}}}, "key 'd_vocab' is not allowed"),
        ({"model": {"overrides": {"n_ctx": 9}}}, "set [model] n_ctx"),
        ({"model": {"overrides": {"n_layers": 3}, "checkpoint": "x"}}, "checkpoint and overrides"),
        ({"patching_options": {"methods": ["activation"]}}, "set the top-level patching_methods"),
        ({"patching_options": {"circuit_size": "all"}}, "circuit_size must be one of"),
        ({"patching_options": {"circuit_size": 0}}, "circuit_size must be >= 1"),
        ({"patching_options": {"ablation_curve_fractions": [0.1, 2]}}, "fractions[1] must be <="),
        ({"margin": "0.1"}, "margin must be a number, got '0.1'"),
        ({"patching": 1}, "patching must be true or false, got 1"),
        ({"rule": {"negated": "no"}}, "rule.negated must be true or false, got 'no'"),
        ({"base_seeds": 0}, "base_seeds must be a list of integers, got 0"),
        ({"ablation": "gaussian"}, "ablation must be one of ['zero', 'mean', 'resample']"),
        ({"patching_methods": ["activaton"]}, "patching_methods[0] must be one of"),
        ({"inits": ["pretraind"]}, "unknown init 'pretraind'"),
        ({"workers": 0}, "workers must be >= 1, got 0"),
    ],
)
def test_bad_values_are_named_by_path(data, message):
    """Wrong types and out-of-range values give an error naming the value's path."""
    with pytest.raises(ValueError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_unknown_key_message_names_table_known_keys_and_close_match():
    with pytest.raises(ValueError) as err:
        config_from_dict({"mask": {"grid": [{"l0_wieght": 1.0}]}})
    msg = str(err.value)
    assert msg.startswith("unknown key 'l0_wieght' in [mask.grid[0]] (did you mean 'l0_weight'?)")
    assert "known keys: ['init', 'l0_weight', 'layers', 'lr', 'target_density', 'target_lr']" in msg


def test_python_construction_is_typed_and_checked():
    """Tables given as dicts become their dataclasses (keys checked); ``validate`` re-checks
    values assigned afterwards."""
    cfg = ExperimentConfig(train={"max_steps": 60}, mask={"grid": [{"l0_weight": 4}]})
    assert isinstance(cfg.train, TrainSettings) and cfg.train.max_steps == 60
    assert isinstance(cfg.mask, MaskSearchConfig)
    assert cfg.mask.grid == [MaskGridPoint(l0_weight=4.0)]
    assert isinstance(cfg.mask.grid[0].l0_weight, float)  # an int given for a number
    with pytest.raises(ValueError, match="unknown key 'max_stepz' in \\[train\\]"):
        ExperimentConfig(train={"max_stepz": 60})
    with pytest.raises(ValueError, match="unknown key 'lrr' in \\[mask.grid\\[0\\]\\]"):
        MaskSearchConfig(grid=[{"lrr": 0.1}])
    cfg.mask.grid[0].lr = "fast"
    with pytest.raises(ValueError, match="mask.grid\\[0\\].lr must be a number, got 'fast'"):
        cfg.validate()


def _full_config() -> dict:
    """A config dict with every table and every override table filled in."""
    return {
        "task": "agreement_plural",
        "rule": {"subject_plural": True},
        "subroutines": ["subject_plural"],
        "inits": ["trained", "random_init"],
        "base_seeds": [3],
        "mask_seeds": [4, 5],
        "data": {"n_train": 10, "n_val": 5, "n_test": 6, "seed": 2, "corpus_size": 50},
        "model": {"preset": "small", "attention": "bidirectional", "pool": "last", "n_ctx": 20,
                  "overrides": {"n_layers": 3, "act_fn": "relu", "rotary_base": 500}},
        "train": {"lr": 0.01, "max_steps": 7, "grad_clip": 0.5, "time_limit_s": 30},
        "pretrain": {"steps": 9, "objective": "mlm", "mask_prob": 0.2},
        "mask": {"kind": "weight", "parametrization": "continuous", "unit_kinds": ["head"],
                 "steps": 11, "layers": [1], "tolerance": 0.0,
                 "epochs": 2.5, "patience": 0, "temp_max": 50.0, "engine": "separate",
                 "grid": [{"lr": 0.2, "init": -1, "l0_weight": 3, "layers": [0, 1]},
                          {}]},
        "margin": 0.1,
        "ablation": "zero",
        "patching_methods": ["integrated_gradients"],
        "patching_options": {"kinds": ["head"], "curve_ablation": "mean", "fractions": [0.5],
                             "faithfulness_target": 0.7, "circuit_size": 5, "use_abs": False,
                             "ig_steps": 3, "ablation_curve_fractions": [0.05, 0.1]},
        "workers": 2,
        "device": "cpu",
    }  # fmt: skip


def test_to_dict_is_json_friendly_and_round_trips():
    """``config_from_dict(cfg.to_dict()) == cfg`` for the defaults, a config with every table
    filled, and every file in configs/; the dict survives JSON unchanged."""
    cfgs = [ExperimentConfig(), config_from_dict(_full_config())]
    files = sorted((ROOT / "configs").glob("*.toml"))
    assert len(files) >= 4
    cfgs += [load_config(f) for f in files]
    for cfg in cfgs:
        d = cfg.to_dict()
        assert json.loads(json.dumps(d)) == d
        back = config_from_dict(d)
        assert back == cfg
        assert back.to_dict() == d
    full = cfgs[1]
    assert full.model.overrides == {"n_layers": 3, "act_fn": "relu", "rotary_base": 500}
    assert full.patching_options.circuit_size == 5
    assert full.patching_options.fractions == (0.5,)
    # a differing value anywhere makes the configs differ
    other = config_from_dict({**_full_config(), "pretrain": {"steps": 10, "objective": "mlm"}})
    assert other != full


def test_default_dict_shape_is_unchanged():
    """Override tables list only the keys that are set, so the manifest / config.json of
    earlier runs compare equal (resumption) with what the plain dicts gave."""
    d = ExperimentConfig().to_dict()
    assert d["train"] == {} and d["pretrain"] == {}
    assert d["mask"]["grid"] == [{"l0_weight": 0.5}, {"l0_weight": 2.0}]
    assert d["patching_options"] == {"ablation_curve_fractions": []}
    assert d["mask"]["unit_kinds"] == ["head", "neuron"]
    assert d["model"]["overrides"] == {}


def test_override_tables_feed_the_real_dataclasses():
    """The override tables act as the mappings the runner and search unpack, and ``build``
    gives the real TrainConfig / PretrainConfig with the runner's fields."""
    from subroutine_circuits.models import PretrainConfig, TrainConfig

    cfg = config_from_dict(_full_config())
    assert dict(cfg.train) == {"lr": 0.01, "max_steps": 7, "grad_clip": 0.5, "time_limit_s": 30.0}
    unpacked = TrainConfig(**{"seed": 3, "device": "cpu", "progress": False, **cfg.train})
    built = cfg.train.build(seed=3, device="cpu", progress=False)
    assert unpacked == built
    assert (built.lr, built.max_steps, built.seed, built.batch_size) == (
        0.01, 7, 3, TrainConfig().batch_size,
    )  # fmt: skip
    built.validate()
    p = cfg.pretrain.build(seed=1, device="cpu", progress=False)
    assert (p.steps, p.objective, p.mask_prob, p.seed, p.lr) == (
        9, "mlm", 0.2, 1, PretrainConfig().lr,
    )  # fmt: skip
    assert ExperimentConfig().train.build() == TrainConfig()  # nothing set: the defaults
    hp = [dict(point) for point in cfg.mask.grid]  # what the search logs and JSON-dumps
    assert hp == [{"lr": 0.2, "init": -1.0, "l0_weight": 3.0, "layers": [0, 1]}, {}]
    json.dumps(hp)
    assert cfg.mask.grid[1].get("lr", cfg.mask.lr) == cfg.mask.lr
    assert "lr" in cfg.mask.grid[0] and "lr" not in cfg.mask.grid[1]
    assert not cfg.mask.grid[1] and len(cfg.mask.grid[0]) == 4


def test_patching_options_feed_patching_config():
    """Every settable PatchingOptions key is a PatchingConfig field and builds one."""
    from subroutine_circuits.experiment.patching import PatchingConfig

    cfg = config_from_dict(_full_config())
    pcfg = PatchingConfig(**{"methods": ("activation",), "seed": 0, **cfg.patching_options})
    assert pcfg.circuit_size == 5 and pcfg.ablation_curve_fractions == (0.05, 0.1)
    assert pcfg.kinds == ("head",) and pcfg.use_abs is False


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _optional(tp):
    return typing.Optional[tp]  # noqa: UP045 (collapses Optional[Optional[x]])


@pytest.mark.parametrize(
    "ours,theirs_path",
    [
        (TrainSettings, "subroutine_circuits.models.train:TrainConfig"),
        (PretrainSettings, "subroutine_circuits.models.pretraining:PretrainConfig"),
        (PatchingOptions, "subroutine_circuits.experiment.patching:PatchingConfig"),
    ],
)
def test_override_tables_mirror_their_dataclasses(ours, theirs_path):
    """Each override table has exactly the fields of the dataclass it feeds, less those it
    refuses (set by the runner), with the same types (made optional)."""
    import importlib

    module, name = theirs_path.split(":")
    theirs = getattr(importlib.import_module(module), name)
    their_fields = {f.name for f in dataclasses.fields(theirs)}
    our_fields = {f.name for f in dataclasses.fields(ours)}
    assert our_fields | set(ours._REFUSED) == their_fields
    assert not our_fields & set(ours._REFUSED)
    ours_h, theirs_h = _hints(ours), _hints(theirs)
    for f in our_fields:
        assert ours_h[f] == _optional(theirs_h[f]), f


def test_grid_points_mirror_the_mask_table():
    """A grid point's keys are [mask] keys of the same types (it replaces their values)."""
    mask_h, point_h = _hints(MaskSearchConfig), _hints(MaskGridPoint)
    for f in dataclasses.fields(MaskGridPoint):
        assert point_h[f.name] == _optional(mask_h[f.name]), f.name


def test_model_override_names_match_hooked_transformer_config():
    """The override names and types mirror TransformerLens' HookedTransformerConfig (3.x) and
    NativeConfig (its mirror for 4.x), less the fields the builder sets; the refused ones are
    real fields too."""
    from subroutine_circuits.models.native import NativeConfig
    from subroutine_circuits.models.tl_compat import tl_major

    if tl_major() < 4:
        from transformer_lens import HookedTransformerConfig

        native = {f.name for f in dataclasses.fields(NativeConfig)}
        assert native == {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    else:
        HookedTransformerConfig = NativeConfig  # noqa: N806

    real = _hints(HookedTransformerConfig)
    names = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    assert set(MODEL_OVERRIDE_TYPES) | set(MODEL_OVERRIDES_REFUSED) == names
    assert not set(MODEL_OVERRIDE_TYPES) & set(MODEL_OVERRIDES_REFUSED)

    def norm(tp):
        """typing.List -> list, Optional/Union -> a set of alternatives."""
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
            return frozenset(norm(a) for a in args)
        return typing.get_origin(tp) or tp

    for name, tp in MODEL_OVERRIDE_TYPES.items():
        assert norm(tp) == norm(real[name]), name


def test_override_checked_by_the_real_model_builder():
    """An accepted override builds a model; the builder's own refusal list is covered."""
    from subroutine_circuits.models import ModelSpec, make_model

    cfg = config_from_dict({"model": {"overrides": {"n_layers": 1, "d_mlp": 32}}})
    spec = ModelSpec(preset=cfg.model.preset, overrides=dict(cfg.model.overrides))
    model = make_model(spec, vocab_size=20)
    assert model.cfg.n_layers == 1 and model.cfg.d_mlp == 32
    builder_refuses = {"d_vocab", "attention_dir", "seed", "device"}
    assert builder_refuses <= set(MODEL_OVERRIDES_REFUSED)


def test_mirrored_constants_match_the_library():
    """Choice lists kept in config.py (to stay torch-free) equal the library's own."""
    from subroutine_circuits.experiment import config as c
    from subroutine_circuits.experiment.patching import METHODS
    from subroutine_circuits.masks.parametrization import PARAMETRIZATIONS
    from subroutine_circuits.models import presets
    from subroutine_circuits.models.pretraining import OBJECTIVES
    from subroutine_circuits.patching.circuits import ABLATIONS

    assert c.PARAMETRIZATIONS == PARAMETRIZATIONS
    assert c.PRETRAIN_OBJECTIVES == OBJECTIVES
    assert set(c.CURVE_ABLATIONS) == set(ABLATIONS)
    assert c.PATCHING_METHODS == METHODS
    assert c.ATTENTION_KINDS == presets.ATTENTION_KINDS and c.POOLS == presets.POOLS


def test_config_pickles_and_copies():
    """Worker processes receive the config by pickle: it survives unchanged, tables included."""
    import copy
    import pickle

    cfg = config_from_dict(_full_config())
    for other in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert other == cfg and other.to_dict() == cfg.to_dict()
        assert isinstance(other.train, TrainSettings) and dict(other.train) == dict(cfg.train)
