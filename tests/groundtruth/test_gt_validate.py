"""Truth checks under the experiment's ablation, the entanglement check, caching of planted
models, the stage hook for a given base model, and ``validate`` end to end on tiny settings."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from subroutine_circuits.groundtruth.planted import (
    PlantedConfig,
    build_modular,
    build_random,
    load_planted,
    save_planted,
)
from subroutine_circuits.groundtruth.prune import all_units
from subroutine_circuits.groundtruth.truth import (
    AblationEvaluator,
    subset_selectivity,
    truth_check,
    unit_necessity,
)

SMALL = PlantedConfig(n_train=200)


@pytest.fixture(scope="module")
def modular():
    torch.set_num_threads(1)
    return build_modular(0, SMALL)


def test_batched_mean_ablation_matches_the_unit_mask_engine(modular):
    """The batched evaluator equals the experiment's own UnitMask (position-aware mean)."""
    ref = modular.splits["train"]["composite"][:60]
    ev = AblationEvaluator(modular.model, modular.tokenizer, "mean", ref)
    units = all_units(modular.model)
    configs = [set(), {units[0]}, set(units[::3]), set(units)]
    problems = modular.splits["val"]["composite"][:25]
    accs, losses = ev.evaluate(problems, configs, max_rows=60)  # several passes
    data = ev.adapter.encode_problems(problems)
    for c, acc, loss in zip(configs, accs, losses):
        mask = ev.base.fixed_like(ev.keep_vector(c))
        with torch.no_grad(), mask.applied(modular.model):
            logits = ev.adapter.ooo_logits(data.inputs)
        assert acc == pytest.approx(float((logits.argmax(-1) == data.odd).float().mean()))
        assert loss == pytest.approx(float(F.cross_entropy(logits, data.odd)), rel=1e-4)
    # mean ablation of everything is not zero ablation of everything
    zero = AblationEvaluator(modular.model, modular.tokenizer, "zero")
    assert zero.evaluate(problems, [set(units)])[1] != pytest.approx(losses[-1])
    with pytest.raises(ValueError, match="reference"):
        AblationEvaluator(modular.model, modular.tokenizer, "mean", [])
    with pytest.raises(ValueError, match="ablation"):
        AblationEvaluator(modular.model, modular.tokenizer, "resample", ref)


def test_subset_selectivity_catches_a_modular_model(modular):
    """On A's units of a modular model some subset breaks A and spares B: the
    entanglement check must reject it; the numbers equal one evaluation per subset."""
    a, b = modular.subroutines
    ev = AblationEvaluator(modular.model, modular.tokenizer, "zero")
    units = sorted(modular.truth[a])[:8]
    parts = {p: modular.splits["val"][f"partition_{p}"][:40] for p in (a, b)}
    sel = subset_selectivity(ev, parts, units, max_units=12)
    assert sel["n_subsets"] == 2 ** len(units) - 1
    best = set(sel[f"most_selective_{a}"])
    (acc_a,), _ = ev.evaluate(parts[a], [best])
    (acc_b,), _ = ev.evaluate(parts[b], [best])
    assert sel[f"max_selectivity_{a}"] == pytest.approx(max(acc_b, 0.25) - max(acc_a, 0.25))
    assert sel[f"max_selectivity_{a}"] > 0.3  # ablating A's units breaks A only
    with pytest.raises(ValueError, match="max_units"):
        subset_selectivity(ev, parts, all_units(modular.model), max_units=10)


def test_truth_check_agrees_with_per_unit_necessity(modular):
    """Each planted unit matters under zero and under mean ablation (the truth is the same for
    both), and the check's minimum is the minimum of an independent per-unit computation."""
    check = truth_check(modular, SMALL)
    assert set(check) == {"mean", "zero"}
    a = modular.subroutines[0]
    ev = AblationEvaluator(modular.model, modular.tokenizer, "zero")
    rest = set(all_units(modular.model)) - modular.parts["A"]["units"]
    probs = modular.splits["val"][f"sub_{a}"]
    (_,), (base,) = ev.evaluate(probs, [rest])
    effects = [ev.evaluate(probs, [rest | {u}])[1][0] - base for u in modular.parts["A"]["units"]]
    assert check["zero"]["min_loss_necessity"] <= min(effects) + 1e-6
    assert check["zero"]["n_checked"] == len(modular.truth[a]) + len(
        modular.truth[modular.subroutines[1]]
    )
    for abl in ("zero", "mean"):
        assert check[abl]["ok"] == (check[abl]["n_below"] == 0)
    nec = unit_necessity(ev, probs, sorted(modular.truth[a]))
    assert len(nec) == len(modular.truth[a])


def test_planted_model_cache_round_trip(modular, tmp_path):
    save_planted(modular, tmp_path / "m", {"k": 1})
    assert load_planted(tmp_path / "m", modular.task, modular.splits, {"k": 2}) is None
    loaded = load_planted(tmp_path / "m", modular.task, modular.splits, {"k": 1})
    assert loaded.truth == modular.truth and loaded.parts == modular.parts
    assert loaded.layout == modular.layout and loaded.expected == "compositional"
    tokens = torch.randint(1, modular.tokenizer.vocab_size, (2, 6))
    torch.testing.assert_close(loaded.model(tokens), modular.model(tokens))
    assert load_planted(tmp_path / "none", modular.task, modular.splits) is None


def test_error_rates_use_expected_verdicts():
    from subroutine_circuits.groundtruth.scoring import error_rates

    rows = [
        {"model_kind": "modular", "verdict": "compositional"},
        {"model_kind": "modular", "verdict": "not compositional"},
        {"model_kind": "modular", "verdict": "search failed"},  # not usable: ignored
        {"model_kind": "redundant", "verdict": "not compositional"},
        {"model_kind": "entangled", "verdict": "compositional"},
        {"model_kind": "random_init", "verdict": "not compositional"},
        {"model_kind": "random_init", "verdict": "excluded"},
    ]
    r = error_rates(rows)
    assert r["missed_compositional"] == 0.5 and r["n_modular"] == 2
    # redundant (right), entangled (wrong), random-init (right): 1 of 3 falsely compositional
    assert r["false_compositional"] == pytest.approx(1 / 3) and r["n_non_compositional"] == 3
    assert r["per_kind"]["redundant"]["error"] == 0.0
    assert math.isnan(error_rates([])["false_compositional"])
    # over ALL runs (failed searches and exclusions included): defined without usable runs
    assert r["all_runs"]["modular"] == {"runs": 3, "called_compositional": 1}
    assert r["all_runs"]["random_init"] == {"runs": 2, "called_compositional": 0}
    from subroutine_circuits.groundtruth.scoring import all_runs_text

    assert all_runs_text(r) == (
        "modular 1 of 3; redundant 0 of 1; entangled 1 of 1; random_init 0 of 2"
    )
    failed = error_rates([{"model_kind": "random_init", "verdict": "search failed"}] * 4)
    assert math.isnan(failed["false_compositional"])
    assert failed["all_runs"]["random_init"] == {"runs": 4, "called_compositional": 0}


def test_validate_end_to_end_and_resumes(tmp_path, monkeypatch):
    """Tiny settings: every row is scored against the truth from the stored masks / patching
    scores; a second call loads everything (no planted model is rebuilt, no mask retrained)."""
    from subroutine_circuits.experiment import validate as V
    from subroutine_circuits.groundtruth.scoring import mask_unit_scores, score_units
    from subroutine_circuits.masks import load_mask
    from subroutine_circuits.store import RunStore

    cfg = V.ValidateConfig(
        seeds=(0,), kinds=("modular", "random_init"), mask_seeds=(0,), n_train=160, n_val=60,
        n_test=60, patching_pairs=8, progress=False,
        experiment={"mask": {"steps": 40, "grid": [{"l0_weight": 0.5}]}},
    )  # fmt: skip
    df = V.validate(tmp_path, cfg=cfg)
    assert list(df.columns[: len(V.COLUMNS)]) == list(V.COLUMNS)
    mod = df[(df.model_kind == "modular") & (df.method == "mask")]
    assert len(mod) == 2 and set(mod.expected) == {"compositional"}
    assert mod.verdict.isin(["compositional", "not compositional", "search failed"]).all()
    assert set(df[df.model_kind == "modular"].method) == {"mask", "activation", "attribution"}
    rnd = df[df.model_kind == "random_init"]
    assert set(rnd.method) == {"mask"} and rnd.roc_auc.isna().all()
    # the mask AUC equals an independent computation from the stored mask and planted truth
    store = RunStore(tmp_path / "runs" / "modular")
    planted = load_planted(tmp_path / "planted" / "modular_s0", *_task_splits(cfg), _key(cfg))
    run = next(r for r in store.read_runs() if r["subroutine"] == mod.iloc[0].subroutine)
    mask = load_mask(store.resolve(run["mask_path"]))
    truth = planted.truth_vector(run["subroutine"], mask.unit_map)
    assert mod.iloc[0].roc_auc == pytest.approx(score_units(mask_unit_scores(mask), truth))
    # randabl_p is the experiment's own (the verdicts' matched random control) when the run has
    # one; validate's fallback (batched) must equal a one-mask-at-a-time computation otherwise
    if run.get("randabl_p") is not None and run["randabl_p"] == run["randabl_p"]:
        assert mod.iloc[0].randabl_p == pytest.approx(run["randabl_p"])
    else:
        assert mod.iloc[0].randabl_p == pytest.approx(_loop_randabl_p(planted, store, run, cfg))
    assert (tmp_path / "groundtruth.csv").is_file()
    # every modular mask run of the first mask seed carries its frontier's verdict
    assert mod[["frontier_gap", "cpr_mask", "cpr_patching"]].notna().all().all()
    # validate trains the mask path: its gaps sit beside the mask ranking's
    assert mod[["frontier_gap_path", "frontier_gap_acc_path", "cpr_path"]].notna().all().all()
    # the planted units the subroutine needs: a subset of the planted subnetwork (or NaN when
    # the planted subnetwork alone misses the success threshold)
    need = mod["n_truth_needed"]
    assert ((need <= mod["n_truth"]) & (need >= 1) | need.isna()).all()
    rates = json.loads((tmp_path / "error_rates.json").read_text())["rates"]
    assert rates["n_modular"] + rates["n_non_compositional"] <= 4
    assert (
        "False &#x27;compositional&#x27;" in (tmp_path / "report.html").read_text()
        or "False 'compositional'" in (tmp_path / "report.html").read_text()
    )
    # resume: nothing is rebuilt or retrained
    monkeypatch.setattr("subroutine_circuits.groundtruth.planted.build_planted", _fail)
    monkeypatch.setattr("subroutine_circuits.experiment.search.search_all", _fail)
    df2 = V.validate(tmp_path, cfg=cfg)
    pd.testing.assert_frame_equal(df.reset_index(drop=True), df2.reset_index(drop=True))


def test_frontier_columns_and_summary_by_hand():
    """The frontier's verdict on a mask run: the worst difference to the best patching ranking
    at each size (random and other runs ignored), and the modular summary with its tie."""
    from subroutine_circuits.experiment import validate as V

    def curve(method, f, acc, cpr, sub="a", seed=0):
        return [
            {"subroutine": sub, "mask_seed": seed, "kind": "curve", "method": method,
             "fraction": fr, "faithfulness": x, "accuracy": y, "cpr": cpr}
            for fr, x, y in zip((0.1, 0.5), f, acc)
        ]  # fmt: skip

    rows = curve("mask", (0.2, 0.9), (0.5, 0.8), 0.6)
    rows += curve("activation", (0.3, 0.8), (0.6, 0.7), 0.5)
    rows += curve("attribution", (0.1, 0.95), (0.4, 0.9), 0.7)
    rows += curve("random", (0.9, 0.99), (0.9, 0.99), 0.9)  # not a patching ranking
    rows += curve("activation", (1.0, 1.0), (1.0, 1.0), 1.0, sub="b")  # another subroutine
    rows += curve("activation", (1.0, 1.0), (1.0, 1.0), 1.0, seed=1)  # another mask seed
    got = V.frontier_columns(rows, "a", 0)
    assert "frontier_gap_path" not in got  # no mask path
    assert got["frontier_gap"] == pytest.approx(min(0.2 - 0.3, 0.9 - 0.95))
    assert got["frontier_gap_acc"] == pytest.approx(min(0.5 - 0.6, 0.8 - 0.9))
    assert (got["cpr_mask"], got["cpr_patching"]) == (0.6, 0.7)
    assert V.frontier_columns(rows, "b", 0) == {}  # no mask ranking there
    # a mask path: its own gaps; the criterion's columns stay the mask ranking's
    with_path = rows + curve(V.PATH, (0.35, 0.7), (0.7, 0.95), 0.65)
    got2 = V.frontier_columns(with_path, "a", 0)
    assert got2["frontier_gap"] == got["frontier_gap"]
    assert got2["frontier_gap_path"] == pytest.approx(min(0.35 - 0.3, 0.7 - 0.95))
    assert got2["frontier_gap_acc_path"] == pytest.approx(min(0.7 - 0.6, 0.95 - 0.9))
    assert got2["cpr_path"] == 0.65

    df = pd.DataFrame(
        [
            {"model_kind": "modular", "method": "mask", "n_kept": 6, "n_truth": 8,
             "frontier_gap": -0.005, "frontier_gap_acc": 0.0, "cpr_mask": 0.9,
             "cpr_patching": 0.8},
            {"model_kind": "modular", "method": "mask", "n_kept": 4, "n_truth": 8,
             "frontier_gap": -0.1, "frontier_gap_acc": -0.2, "cpr_mask": 0.5,
             "cpr_patching": 0.7},
            {"model_kind": "redundant", "method": "mask", "n_kept": 40, "n_truth": 8,
             "frontier_gap": -0.9, "frontier_gap_acc": -0.9, "cpr_mask": 0.1,
             "cpr_patching": 0.9},
        ]
    )  # fmt: skip
    summary = V.frontier_summary(df)
    assert "size_within_needed" not in summary and "path_at_or_above" not in summary
    df["n_truth_needed"] = [3, 4, 8]
    df["frontier_gap_path"], df["frontier_gap_acc_path"] = [0.0, -0.3, 0.0], [0.1, -0.05, 0.0]
    df["cpr_path"] = [0.8, 0.6, 0.1]
    both = V.frontier_summary(df)
    assert both["size_within_needed"] == 1  # 6/3 = 2 beyond 1.5x, 4/4 within
    assert (both["path_at_or_above"], both["path_at_or_above_acc"]) == (1, 1)
    assert both["path_worst_gap"] == pytest.approx(-0.3)
    assert both["cpr_path_median"] == pytest.approx(0.7)
    assert "mask path" in V.frontier_sentence(both) and "1-minimal" in V.frontier_sentence(both)
    summary = V.frontier_summary(df.drop(columns=["n_truth_needed", "frontier_gap_path"]))
    assert (summary["n"], summary["size_within"]) == (2, 1)  # 0.75 within 1.5x, 0.5 not
    assert (summary["at_or_above"], summary["at_or_above_acc"]) == (1, 1)  # -0.005: a tie
    assert summary["worst_gap"] == pytest.approx(-0.1)
    assert "1 chose a mask within 1.5x" in V.frontier_sentence(summary)


def _loop_randabl_p(planted, store, run, vcfg):
    """Independent randabl_p: each matched draw ablated by its own UnitMask (mean ablation over
    the subroutine's training problems, as evaluate.py does for the learned mask)."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.analysis.inference import randabl_p
    from subroutine_circuits.experiment import validate as V
    from subroutine_circuits.experiment.batched import matched_random_masks
    from subroutine_circuits.masks import UnitMask, load_mask

    ad = as_adapter(planted.model, tokenizer=planted.tokenizer, pool="last")
    mask = load_mask(store.resolve(run["mask_path"]), ad)
    keep = mask.flat_binary().bool()
    draws = matched_random_masks(mask.unit_map, keep, V.N_RANDOM, int(run["mask_seed"]) + 10_000)
    ref = ad.encode_problems(planted.splits["train"][f"sub_{run['subroutine']}"])
    diffs = []
    for d in draws:
        m = UnitMask.fixed(mask.unit_map, ~d, ablation="mean")
        m.set_mean(ad, ref.flat_inputs())
        accs = [
            max(ad.accuracy(ad.encode_problems(planted.splits["test"][f"partition_{p}"]), m), 0.25)
            for p in (run["subroutine"], run["other"])
        ]
        diffs.append(accs[0] - accs[1])
    return randabl_p(run["abl_diff"], diffs)


def _fail(*a, **k):
    raise AssertionError("recomputed on resume")


def _task_splits(cfg):
    from subroutine_circuits.experiment import validate as V
    from subroutine_circuits.experiment.data import prepare

    prep = prepare(V.experiment_config(cfg))
    return prep.task, prep.splits


def _key(cfg):
    from subroutine_circuits.experiment import validate as V

    exp = V.experiment_config(cfg)
    pcfg = V.planted_config(cfg, exp)
    return {"planted": pcfg.to_dict(), "data": exp.data.to_dict(), "task": cfg.task}


def test_stage_uses_a_given_base_model(tmp_path):
    """``base_model_stage(..., given=)`` studies the given model and stores it for resumption."""
    from subroutine_circuits.experiment import validate as V
    from subroutine_circuits.experiment.data import prepare
    from subroutine_circuits.experiment.jobs import BaseModelJob
    from subroutine_circuits.experiment.stages import base_model_stage
    from subroutine_circuits.store import RunStore

    cfg = V.experiment_config(V.ValidateConfig(n_train=60, n_val=20, n_test=20))
    prep = prepare(cfg)
    r = build_random(3, SMALL, splits=prep.splits)
    store = RunStore(tmp_path)
    job = BaseModelJob(cfg, str(tmp_path), prep.label, "random_init", 3)
    base = base_model_stage(job, prep, store, given=(r.model, {"note": "planted"}))
    assert base.adapter.model is r.model and base.meta["note"] == "planted"
    assert store.has_model(job.key)
    again = base_model_stage(job, prep, store)  # loaded from the store, same weights
    tokens = torch.randint(1, r.tokenizer.vocab_size, (2, 5))
    torch.testing.assert_close(again.adapter.model(tokens), r.model(tokens))


def test_report_splits_redundant_verdicts_by_copies_touched():
    """The validate report counts redundant runs by how many copies their mask touches."""
    from subroutine_circuits.experiment import validate as V
    from subroutine_circuits.groundtruth.scoring import error_rates

    rows = [
        {"model_kind": "redundant", "seed": 0, "subroutine": "a", "method": "mask",
         "roc_auc": 0.9, "precision": 1.0, "recall": 0.5, "copies_touched": c, "verdict": v}
        for c, v in [(1, "not compositional"), (1, "not compositional"), (2, "compositional")]
    ]  # fmt: skip
    df = pd.DataFrame(rows)
    html = V.section_groundtruth(df, error_rates(rows))
    assert "verdicts by the copies of its subroutine a mask touches" in html
    table = html.split("a mask touches")[1]
    # one row per copies_touched value, with its verdict counts
    assert re.search(r"<td>1</td>\s*<td>0</td>\s*<td>2</td>", table)
    assert re.search(r"<td>2</td>\s*<td>1</td>\s*<td>0</td>", table)
    assert "(redundant, entangled, random-init)" in html


def test_planted_table_shows_the_redundancy_check_and_draws():
    """The report's planted table gives, per ablation, the largest partition drop of ablating
    one copy and of ablating a minimal sufficient subnetwork, and how many draws it took."""
    from subroutine_circuits.experiment import validate as V

    def check(copy, mins, checked=True):
        minimal = {p: {"checked": checked, "max_drop": d} for p, d in zip("ab", mins)}
        return {"max_drop": copy, "minimal": minimal, "ok": True}

    metrics = {
        "redundancy_check": {
            "mean": check(0.02, [0.011, 0.031]),
            "zero": check(0.01, [0.0, 0.004]),
        },
        "attempts": [{"ok": {}}, {"ok": {}}, {"ok": {}}],
    }
    models = {"redundant_s0": {"summary": {"metrics": metrics}}, "modular_s0": {"summary": {}}}
    html = V._planted_table(models)
    assert "minimal subnetworks ablated: largest partition drop" in html
    assert "{&quot;mean&quot;: 0.031, &quot;zero&quot;: 0.004}" in html or (
        '{"mean": 0.031, "zero": 0.004}' in html
    )
    assert re.search(r"<td>3</td>", html)  # draws of the parts
    # a subroutine that was not enumerated has no drop to show
    assert V._minimal_drop(check(0.0, [0.01, 0.02], checked=False)) is None


def test_validate_records_a_redundant_model_that_could_not_be_built(tmp_path, monkeypatch):
    """A redundant build that gives up is recorded (``build_failed.json``) and not retried on
    the next call with the same settings."""
    from subroutine_circuits.experiment import validate as V
    from subroutine_circuits.groundtruth.planted import RedundantBuildError

    def fail(*a, **k):
        raise RedundantBuildError("redundant model for seed 0: none of 1 draws passed")

    cfg = V.ValidateConfig(seeds=(0,), kinds=("redundant",), n_train=160, n_val=60, n_test=60)
    exp = V.experiment_config(cfg)
    pcfg = V.planted_config(cfg, exp)
    assert pcfg.sufficient_acc == exp.mask_min_acc and pcfg.minimal_tol == exp.mask.tolerance
    from subroutine_circuits.experiment.data import prepare

    prep = prepare(exp)
    monkeypatch.setattr("subroutine_circuits.groundtruth.planted.build_planted", fail)
    planted, reason = V.planted_model("redundant", 0, tmp_path, pcfg, prep, _key(cfg))
    assert planted is None and "none of 1 draws passed" in reason
    assert (tmp_path / "planted" / "redundant_s0" / "build_failed.json").is_file()
    monkeypatch.setattr("subroutine_circuits.groundtruth.planted.build_planted", _fail)
    assert V.planted_model("redundant", 0, tmp_path, pcfg, prep, _key(cfg))[1] == reason


def test_validate_cli_passes_workers_and_kinds_and_refuses_bad_ones(tmp_path, monkeypatch, capsys):
    """``--workers`` and ``--kinds`` reach the ValidateConfig; a bad value is a clear error."""
    from subroutine_circuits.cli import main
    from subroutine_circuits.experiment import validate as V

    seen = {}

    def fake_validate(out, seeds=None, cfg=None):
        cfg.validate()
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(V, "validate", fake_validate)
    with pytest.raises(SystemExit):
        main(["validate", "--out", str(tmp_path), "--workers", "5", "--kinds", "modular"])
    assert seen["cfg"].workers == 5 and seen["cfg"].kinds == ("modular",)
    assert main(["validate", "--out", str(tmp_path), "--workers", "0"]) == 2
    assert "workers must be >= 1, got 0" in capsys.readouterr().err
