"""frontier.csv and the report's frontier figure from a small experiment (issue 23), checked
against the evaluation stage's own numbers for the chosen masks."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory):
    from subroutine_circuits.experiment import config_from_dict, run_experiment

    cfg = config_from_dict(
        {
            "task": "agreement_singular",
            "inits": ["trained"],
            "base_seeds": [0],
            "mask_seeds": [0],
            "min_composite_acc": 0.0,
            "patching": True,
            "patching_inits": ["trained"],
            "patching_pairs": 8,
            "ablation": "mean",
            "data": {"n_train": 80, "n_val": 24, "n_test": 24},
            "model": {"preset": "tiny", "overrides": {"d_mlp": 32}},
            "train": {"max_steps": 40, "eval_every": 40},
            "mask": {"steps": 30, "lr": 0.1, "init": 1.0, "grid": [{"l0_weight": 1.0}]},
            "n_random": 20,
        }
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("frontier") / "out"
    run_experiment(cfg, out, progress=False)
    return out


def test_frontier_csv_has_every_ranking_and_the_chosen_mask(frontier_run):
    fr = pd.read_csv(frontier_run / "frontier.csv")
    curves = fr[fr["kind"] == "curve"]
    assert set(curves["method"]) == {"mask", "activation", "attribution", "random"}
    assert set(fr["subroutine"]) == {"subject_plural", "verb_plural"}
    for (_, method), g in curves.groupby(["subroutine", "method"]):
        assert g["fraction"].tolist() == sorted(g["fraction"]) and len(g) == 9
        assert g["cpr"].nunique() == 1 and g["cmd"].nunique() == 1
        assert (g["k"] == (g["fraction"] * g["n_units"]).round()).all()
        assert g["n_orders"].iloc[0] == (3 if method == "random" else 1)
    results = pd.read_csv(frontier_run / "results.csv").set_index(["subroutine", "mask_seed"])
    points = fr[fr["kind"] == "point"]
    assert len(points) == 2 and set(points["method"]) == {"chosen mask"}
    for _, p in points.iterrows():
        row = results.loc[(p["subroutine"], p["mask_seed"])]
        # the chosen mask's accuracy alone on its subroutine's test problems: the evaluation
        # stage's sub_sub_acc (computed there, not by the frontier)
        assert p["accuracy"] == pytest.approx(row["sub_sub_acc"], abs=1e-9)
        assert p["k"] == row["n_kept"] and p["fraction"] == pytest.approx(p["k"] / p["n_units"])
        assert not math.isnan(p["faithfulness"])


def test_circuits_folder_round_trips(frontier_run):
    """circuits/ holds the mask and each method's circuit as MIB JSON; the mask's file loads
    back to the stored mask's kept units."""
    from subroutine_circuits import RunStore, import_circuit, load_mask, load_model

    names = sorted(p.name for p in (frontier_run / "circuits").glob("*.json"))
    assert len(names) == 2 * 3  # 2 subroutines x (mask, activation, attribution)
    results = pd.read_csv(frontier_run / "results.csv")
    row = results[results["subroutine"] == "subject_plural"].iloc[0]
    (model_dir,) = (frontier_run / "models").iterdir()  # one base model
    model = load_model(model_dir)
    mask = load_mask(RunStore(frontier_run).resolve(row["mask_path"]), model)
    path = next((frontier_run / "circuits").glob("*subject_plural_mask.json"))
    assert torch.equal(import_circuit(path), mask.flat_binary().bool().cpu())
    patch = pd.read_csv(frontier_run / "patching.csv").set_index(["subroutine", "method"])
    for method in ("activation", "attribution"):
        path = next((frontier_run / "circuits").glob(f"*subject_plural_{method}.json"))
        assert int(import_circuit(path).sum()) == patch.loc[("subject_plural", method), "k"]


def test_report_draws_the_frontier(frontier_run):
    page = (frontier_run / "report.html").read_text(encoding="utf-8")
    start = page.index('<section id="frontier">')
    section = page[start : page.index("</section>", start)]
    assert section.count("<svg") == 2  # one figure per subroutine
    assert "CPR" in section and "section unavailable" not in section
