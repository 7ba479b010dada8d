"""The verdict layer end to end: converged masks, mask_ok, matched random controls, the bypass
check, validation-based exclusion, and bit-identical reruns with one torch thread."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from subroutine_circuits.experiment import config_from_dict, run_experiment


def tiny_config(**extra) -> dict:
    """One trained and one random-init base model, two mask seeds, 20 random draws."""
    cfg = {
        "task": "agreement_singular",
        "inits": ["trained", "random_init"],
        "base_seeds": [0],
        "mask_seeds": [0, 1],
        "patching": False,
        "n_random": 20,
        "data": {"n_train": 120, "n_val": 40, "n_test": 40, "corpus_size": 200},
        "train": {"max_steps": 80, "eval_every": 40},
        "mask": {"epochs": 3, "eval_every": 5, "patience": 2, "lr": 0.1, "init": 1.0,
                 "grid": [{"l0_weight": 4.0}]},
    }  # fmt: skip
    cfg.update(extra)
    return cfg


def random_test_split(g: torch.Generator) -> dict:
    """Random token problems (12 per kind, 4 stimuli of 7 tokens) for subroutines a and b."""
    from subroutine_circuits.adapters.base import EncodedProblems

    def problems(n):
        toks = torch.randint(1, 50, (n, 4, 7), generator=g)
        return EncodedProblems({"tokens": toks, "lengths": torch.full((n, 4), 7)},
                               torch.randint(0, 4, (n,), generator=g))  # fmt: skip

    return {k: problems(12) for k in ("partition_a", "partition_b", "sub_a", "sub_b")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("verdicts")
    cfg = config_from_dict(tiny_config())
    run_experiment(cfg, out, progress=False)
    return cfg, out, pd.read_csv(out / "results.csv")


def test_verdict_columns_follow_the_rules(run):
    """mask_ok, randabl_p, the verdict and the paper's criterion follow their definitions on
    every row."""
    from subroutine_circuits.analysis.inference import run_verdict

    cfg, out, df = run
    assert len(df) == 2 * 2 * 2
    for col in ("mask_ok", "mask_val_acc", "mask_steps", "randabl_p", "randabl_diff_mean",
                "randabl_n_distinct", "verdict", "bypass", "composite_val_acc",
                "ablzero_target_acc", "ablresample_other_acc", "density_head", "margins_ok",
                "paper_compositional"):  # fmt: skip
        assert col in df.columns, col
    for _, r in df.iterrows():
        assert r.verdict == run_verdict(r, margin=cfg.margin)
        assert bool(r.compositional) == (r.verdict == "compositional")
        margins = bool(r.sub_diff > cfg.margin and r.abl_diff < -cfg.margin)
        assert bool(r.margins_ok) == margins
        usable_base = bool(r.base_ok) and not bool(r.bypass)
        assert bool(r.paper_compositional) == (usable_base and bool(r.mask_ok) and margins)
        assert bool(r.mask_ok) == (r.mask_val_acc >= cfg.mask_min_acc)
        assert 1 <= r.mask_steps <= 12  # ceil(3 epochs * 120 / 32) = 12
        usable = bool(r.base_ok) and not bool(r.bypass) and bool(r.mask_ok)
        if usable:
            assert r.n_random == 20 and 1 / 21 <= r.randabl_p <= 1
            assert 1 <= r.randabl_n_distinct <= 20
        else:
            assert math.isnan(r.randabl_p) and r.n_random == 0
            assert r.verdict in ("search failed", "excluded")
        base_ok = r.init == "random_init" or r.composite_val_acc >= cfg.min_composite_acc
        assert bool(r.base_ok) == base_ok  # validation, never test accuracy
    comp = df[df["compositional"].astype(bool)]
    assert comp["mask_ok"].all() and (comp["randabl_p"] <= 0.05).all()
    assert comp["margins_ok"].all() and comp["paper_compositional"].all()
    assert set(df["ablation"]) == {"mean"}


def test_manifest_records_the_bypass_check(run):
    cfg, out, df = run
    manifest = json.loads((out / "manifest.json").read_text())
    checks = manifest["bypass_check"]
    assert set(checks) == {"agreement_singular__trained__s0", "agreement_singular__random_init__s0"}
    for c in checks.values():
        assert set(c["accuracies"]) == {
            "composite", "partition_subject_plural", "partition_verb_plural",
        }  # fmt: skip
        far = any(abs(a - 0.25) > cfg.bypass_tolerance for a in c["accuracies"].values())
        assert c["bypass"] == far and (c["path"] is not None) == far
        assert c["ablation"] == "mean"
    assert manifest["bypass_base_models"] == sorted(k for k, c in checks.items() if c["bypass"])
    search = json.loads(next((out / "search").glob("*trained*.json")).read_text())
    assert search["log"][0]["runs"]["0"]["history"]  # the convergence record is kept


def test_bypass_check_flags_units_left_out_of_the_masks(run):
    """A planted bypass: masks over heads only leave every MLP neuron in place; the trained
    model's verb information reaches the readout through them and the check says so."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.data import prepare
    from subroutine_circuits.experiment.verdicts import bypass_check, reference_ablators
    from subroutine_circuits.models import load_checkpoint

    cfg, out, _ = run
    model, tok, _ = load_checkpoint(out / "models" / "agreement_singular__trained__s0")
    prep = prepare(cfg)
    adapter = as_adapter(model, tokenizer=tok).freeze()
    enc = {k: adapter.encode_problems(v) for k, v in prep.splits["val"].items()}
    ref = adapter.encode_problems(prep.splits["train"]["composite"])
    heads = config_from_dict(tiny_config(mask={"unit_kinds": ["head"]}))
    for c, want in ((cfg, False), (heads, True)):
        abl = reference_ablators(adapter, c, ref, seed=0, kinds=("mean",))["mean"]
        got = bypass_check(adapter, c, enc, prep.subroutines, abl)
        assert got["bypass"] is want, got
    assert "residual stream" in got["path"] and got["unit_kinds"] == ["head"]


def test_one_thread_reruns_are_bit_identical_and_anneal_to_temp_max(tmp_path):
    """Two runs of one config give byte-identical results.csv (one torch thread); continuous
    sparsification ends at temp_max when the whole budget runs."""
    from subroutine_circuits.masks import load_mask

    assert torch.get_num_threads() == 1
    extra = {"inits": ["trained"], "mask_seeds": [0],
             "mask": {"parametrization": "continuous", "steps": 10, "eval_every": 5,
                      "patience": 0, "lr": 0.1, "temp_max": 120.0}}  # fmt: skip
    cfg = config_from_dict(tiny_config(**extra))
    run_experiment(cfg, tmp_path / "a", progress=False)
    run_experiment(cfg, tmp_path / "b", progress=False)
    a = (tmp_path / "a" / "results.csv").read_bytes()
    assert a == (tmp_path / "b" / "results.csv").read_bytes()
    df = pd.read_csv(tmp_path / "a" / "results.csv")
    assert (df["mask_steps"] == 10).all()
    assert df["mask_final_temp"].to_numpy() == pytest.approx(120.0)
    mask = load_mask(tmp_path / "a" / df["mask_path"].iloc[0])
    assert float(mask.parts[0].temperature) == pytest.approx(120.0)


def test_mirrored_verdict_constants_match_the_library():
    from subroutine_circuits.experiment import config as c
    from subroutine_circuits.experiment.batched import NOISE_MODES
    from subroutine_circuits.masks.ablator import ABLATIONS

    assert c.ABLATIONS == ABLATIONS and c.NOISE_MODES == NOISE_MODES


def test_demo_config_is_the_shipped_agreement_config():
    """configs/agreement.toml holds the demo's settings (5 base models per init, >= 20 draws)."""
    from pathlib import Path

    from subroutine_circuits.experiment import load_config
    from subroutine_circuits.experiment.config import demo_config

    demo = demo_config()
    shipped = load_config(Path(__file__).resolve().parents[2] / "configs" / "agreement.toml")
    shipped.workers = demo.workers
    assert demo.to_dict() == shipped.to_dict()
    assert len(demo.base_seeds) >= 5 and set(demo.inits) == {"trained", "pretrained",
                                                             "random_init"}  # fmt: skip
    assert demo.n_random >= 20 and demo.data.n_test >= 250


def test_random_controls_usable_or_candidates_only():
    """Draws go to usable runs; with a margin, only to runs that pass both margins; a draw
    keeps as many units per (layer, kind) as the learned mask and randabl_p follows them."""
    import numpy as np
    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.experiment.evaluate import RunToEvaluate, evaluate_unit_runs
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    model = make_tiny_transformer(seed=4)
    g = torch.Generator().manual_seed(0)

    test = random_test_split(g)
    um = tl_unit_map(model)
    keep = torch.rand(um.n_units, generator=g) < 0.3
    mask = UnitMask.fixed(um, keep)
    runs = [RunToEvaluate("a", "b", 0, mask, True, 1), RunToEvaluate("b", "a", 0, mask, False, 2)]
    adapter = as_adapter(model, pool="last")
    abls = {"zero": Ablator("zero")}
    rows = evaluate_unit_runs(adapter, runs, test, abls, "zero", n_random=20)
    assert rows[0]["n_random"] == 20 and rows[1]["n_random"] == 0
    assert 1 / 21 <= rows[0]["randabl_p"] <= 1 and np.isnan(rows[1]["randabl_p"])
    assert rows[0]["randabl_n_distinct"] == 20
    strict = evaluate_unit_runs(adapter, runs, test, abls, "zero", n_random=20, margin=0.7)
    assert strict[0]["n_random"] == 0  # no run can pass a 0.7 margin on random data
    for k in ("sub_diff", "abl_diff", "ablzero_diff"):
        assert strict[0][k] == rows[0][k]


def test_runs_over_different_unit_maps_are_evaluated_per_map():
    """Grid points that mask different layers give masks over different unit maps; one base
    model's runs then go to the evaluation in one group per map, each row equal to evaluating
    that run alone."""
    from types import SimpleNamespace

    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.experiment.evaluate import RunToEvaluate, evaluate_unit_runs
    from subroutine_circuits.experiment.verdicts import _evaluate
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    model = make_tiny_transformer(seed=4)
    g = torch.Generator().manual_seed(0)

    test = random_test_split(g)
    full, last = tl_unit_map(model), tl_unit_map(model, layers=[1])
    assert full != last
    m_full = UnitMask.fixed(full, torch.rand(full.n_units, generator=g) < 0.4)
    m_last = UnitMask.fixed(last, torch.rand(last.n_units, generator=g) < 0.4)

    def planned(sub, other, mask):
        return SimpleNamespace(subroutine=sub, other=other, mask_seed=0), SimpleNamespace(mask=mask)

    ev = {"a0": planned("a", "b", m_full), "b0": planned("b", "a", m_last)}
    base = SimpleNamespace(
        adapter=as_adapter(model, pool="last"), base_ok=False, bypass=False,
        enc={"test": test}, ablators={"zero": Ablator("zero")},
    )  # fmt: skip
    cfg = SimpleNamespace(mask=SimpleNamespace(kind="unit"), random_controls="all", margin=0.05,
                          ablation="zero", n_random=20, chance=0.25, mask_min_acc=0.9,
                          random_shortcuts=True)  # fmt: skip
    rows = _evaluate(base, cfg, ev, {"a": "b", "b": "a"}, base_seed=0)
    for key, sub, other, mask in (("a0", "a", "b", m_full), ("b0", "b", "a", m_last)):
        alone = evaluate_unit_runs(
            base.adapter, [RunToEvaluate(sub, other, 0, mask, False)], test,
            base.ablators, "zero", 20,
        )[0]  # fmt: skip
        assert rows[key]["abl_diff"] == alone["abl_diff"]
        assert rows[key]["sub_target_acc"] == alone["sub_target_acc"]
        assert rows[key]["n_kept"] == alone["n_kept"]


def test_default_threads_make_reruns_identical_under_a_multithreaded_torch(tmp_path):
    """With torch set to 2 threads (the default on this 2-core machine, where two such runs gave
    masks whose density differed by up to 0.29), the study's ``threads = 1`` default makes two
    in-process runs give identical numbers; the caller's thread count is restored."""
    from subroutine_circuits.utils import torch_threads

    with torch_threads(2):
        cfg = config_from_dict(tiny_config(workers=1, inits=["trained"], mask_seeds=[0, 1, 2]))
        assert cfg.threads == 1
        run_experiment(cfg, tmp_path / "a", progress=False)
        assert torch.get_num_threads() == 2
        run_experiment(cfg, tmp_path / "b", progress=False)
    assert torch.get_num_threads() == 1
    a = pd.read_csv(tmp_path / "a" / "results.csv")
    b = pd.read_csv(tmp_path / "b" / "results.csv")
    num = a.select_dtypes("number").columns
    assert a[num].equals(b[num]) and (a["verdict"] == b["verdict"]).all()
    with pytest.raises(ValueError, match="threads"):
        config_from_dict(tiny_config(threads=0)).validate()
