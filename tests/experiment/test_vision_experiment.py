"""The vision path through the same experiment: image splits, base models per init, the
bypass check, exclusion on validation accuracy, outputs and report, resumption."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from subroutine_circuits.experiment import vision
from subroutine_circuits.experiment.config import ExperimentConfig
from subroutine_circuits.tasks.vision import scene_keys, vision_task

TINY_CNN = {
    "stem_channels": 4, "stage_widths": [4, 8], "stage_channels": [4, 8],
    "stage_blocks": [1, 1], "stage_strides": [1, 2], "d_hidden": 8, "d_embed": 8,
}  # fmt: skip


def tiny_config(**kw) -> ExperimentConfig:
    """Three inits, one base seed, two mask seeds; a 2-stage CNN on 32 px Number-Contact."""
    base = dict(
        task="number_contact", inits=["trained", "pretrained", "random_init"], base_seeds=[0],
        mask_seeds=[0, 1],
        data={"n_train": 12, "n_train_composite": 24, "n_val": 8, "n_test": 8, "corpus_size": 24},
        model={"family": "cnn", "preset": "cpu", "image_size": 32, "overrides": TINY_CNN},
        train={"max_steps": 3, "eval_every": 2, "batch_size": 8},
        simclr={"max_steps": 2, "batch_size": 8},
        mask={"steps": 2, "batch_size": 4, "grid": [{"l0_weight": 0.5}]},
        patching_pairs=3, workers=1, device="cpu",
        patching_options={"fractions": [0.0, 0.5, 1.0]},
    )  # fmt: skip
    base.update(kw)
    cfg = ExperimentConfig(**base)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def prep():
    from subroutine_circuits.experiment.data import prepare

    return prepare(tiny_config())


def test_splits_have_exact_counts_and_share_no_scene(prep):
    counts = vision.image_split_counts(prep.task, tiny_config().data)
    assert set(prep.splits["train"]) == {"composite", "sub_number", "sub_contact"}
    for split, kinds in counts.items():
        for kind, n in kinds.items():
            assert len(prep.splits[split][kind]) == n
            assert prep.splits[split][kind].image_size == 32
    keys = {s: set().union(*(scene_keys(p.labels) for p in prep.splits[s].values()))
            for s in ("train", "val", "test")}  # fmt: skip
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]


def test_parallel_drawing_gives_the_same_data(monkeypatch):
    task = vision_task("number_contact", image_size=32)
    counts = {"train": {"composite": 7}, "val": {"composite": 3}, "test": {"composite": 3}}
    monkeypatch.setattr(vision, "CHUNK", 3)  # several chunks per kind
    one = vision.make_image_splits(task, counts, seed=1, workers=1)
    monkeypatch.setattr(vision, "PARALLEL_MIN", 1)
    two = vision.make_image_splits(task, counts, seed=1, workers=2)
    for split in counts:
        assert np.array_equal(one[split]["composite"].images, two[split]["composite"].images)
        assert np.array_equal(one[split]["composite"].odd, two[split]["composite"].odd)


def test_pretraining_images_come_from_the_training_split_only(prep):
    x = vision.pretraining_images(prep, 20, seed=0)
    assert x.shape == (20, 3, 32, 32)
    as_u8 = lambda t: np.round((t.numpy() * 0.1 + 0.9) * 255).astype(np.uint8)  # noqa: E731
    got = {im.tobytes() for im in as_u8(x.movedim(1, -1))}
    train = {im.tobytes() for p in prep.splits["train"].values() for im in
             p.images.reshape(-1, 32, 32, 3)}  # fmt: skip
    other = {im.tobytes() for s in ("val", "test") for p in prep.splits[s].values() for im in
             p.images.reshape(-1, 32, 32, 3)}  # fmt: skip
    assert got <= train and not got & other
    assert not torch.equal(x, vision.pretraining_images(prep, 20, seed=1))


def test_base_models_per_init(prep):
    cfg = tiny_config()
    models = {i: vision.build_cnn_base_model(cfg, prep, i, 0, "cpu") for i in cfg.inits}
    trained, pretrained, random = (models[i] for i in ("trained", "pretrained", "random_init"))
    assert "pretrain" not in trained[1] and trained[1]["compute"]["train_steps"] == 3
    assert pretrained[1]["pretrain"]["steps"] == 2 and pretrained[1]["pretrain"]["head_reset"]
    assert pretrained[1]["compute"]["train_steps"] == 3  # the same fine-tuning budget
    assert "train" not in random[1] and random[1]["compute"]["total_seconds"] == 0.0
    # random_init is the untrained init of the seed: the trained model started from it
    from subroutine_circuits.models.cnn import HookedCNN

    fresh = HookedCNN(vision.cnn_model_config(cfg, prep.task, 0, "cpu"))
    for (n, p), (_, q) in zip(random[0].named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_image_pair_data_metric_is_the_oddness_of_the_clean_image(prep):
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.patching import PatchingConfig, build_pair_data
    from subroutine_circuits.models.cnn import HookedCNN

    adapter = as_adapter(HookedCNN(vision.cnn_model_config(tiny_config(), prep.task, 0, "cpu")))
    pcfg = PatchingConfig(n_pairs=3, seed=2, kinds=("channel", "neuron"))
    data, _ = build_pair_data(adapter, None, prep.task, "contact", pcfg)  # (scoring, faith)
    (batch,) = data.batches
    assert data.n_pairs == 3
    assert data.readout == "embed" and batch.clean_tokens.shape == (3, 3, 32, 32)
    # the scoring set comes from the val stream (issue 22: circuits are chosen on validation)
    pairs = prep.task.make_minimal_pairs("contact", 3, seed=2, split="val")
    with torch.no_grad():
        emb = adapter.embed({"images": pairs.to_tensors()["clean"]})
        ctx = adapter.embed({"images": pairs.to_tensors()["contexts"].reshape(-1, 3, 32, 32)})
    e = torch.nn.functional.normalize(emb, dim=-1)
    c = torch.nn.functional.normalize(ctx, dim=-1).view(3, 3, -1)
    want = -(e[:, None] * c).sum(-1).sum(-1)  # the OOO score of the clean image among contexts
    torch.testing.assert_close(batch.metric(emb), want)


def test_vision_experiment_end_to_end(tmp_path):
    from subroutine_circuits.experiment.runner import run_experiment

    cfg = tiny_config(min_composite_acc=0.0)
    out = tmp_path / "vis"
    df = run_experiment(cfg, out, progress=False)
    for name in ("results.csv", "summary.csv", "patching.csv", "manifest.json", "report.html"):
        assert (out / name).exists(), name
    assert len(df) == 3 * 2 * 2 and set(df["init"]) == set(cfg.inits)
    assert df["bypass"].notna().all() and not df["bypass"].astype(bool).any()
    metas = {p.parent.name: json.loads(p.read_text()) for p in (out / "models").glob("*/meta.json")}
    for bid, m in metas.items():  # the shared base-model stage's bypass check (every unit off)
        accs = m["bypass_check"]["accuracies"]
        assert set(accs) == {"composite", "partition_number", "partition_contact"}, bid
        assert all(abs(a - cfg.chance) <= cfg.bypass_tolerance for a in accs.values()), bid
    # CNNs have no resample ablation (token inputs only): its robustness columns are absent
    assert "ablresample_target_acc" not in df.columns
    assert df["ablzero_target_acc"].notna().all() and (df["ablation"] == "mean").all()
    patch = pd.read_csv(out / "patching.csv")
    assert set(patch["method"]) == {"activation", "attribution"}
    assert set(patch["init"]) == {"trained", "pretrained"}
    assert (patch["n_units"] == 4 + 4 + 8 + 8).all()  # stem, 2 hidden groups, head neurons
    frontier = pd.read_csv(out / "frontier.csv")  # the channel frontier (issue 23)
    curves = frontier[frontier["kind"] == "curve"]
    assert set(curves["method"]) == {"mask", "activation", "attribution", "random"}
    assert (frontier["n_units"] == 24).all() and frontier["accuracy"].between(0, 1).all()
    assert not (out / "circuits").exists() or not list((out / "circuits").iterdir())  # channels
    page = (out / "report.html").read_text()
    assert 'id="frontier"' in page
    assert 'id="stimuli"' in page and 'id="channels"' in page and "data:image/png;base64" in page
    assert 'id="attention"' not in page
    # resuming reruns nothing: the stored models are loaded, not retrained
    stamp = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/weights.pt")}
    again = run_experiment(cfg, out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    pd.testing.assert_frame_equal(again.reset_index(drop=True), df.reset_index(drop=True))


def test_exclusion_is_decided_on_validation_accuracy(tmp_path):
    """A base model under min_composite_acc on VALIDATION data is excluded and listed."""
    from subroutine_circuits.experiment.runner import run_experiment

    cfg = tiny_config(inits=["trained", "random_init"], mask_seeds=[0], patching=False,
                      min_composite_acc=0.99)  # fmt: skip
    out = tmp_path / "excl"
    df = run_experiment(cfg, out, progress=False)
    meta = json.loads((out / "models" / "number_contact__trained__s0" / "meta.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    ok = meta["composite_val_acc"] >= 0.99  # the shared base-model stage's key
    assert bool(df.loc[df["init"] == "trained", "base_ok"].iloc[0]) == ok
    assert ("number_contact__trained__s0" in manifest["excluded_base_models"]) == (not ok)
    assert df.loc[df["init"] == "random_init", "base_ok"].all()  # controls are always kept


def test_runs_over_different_unit_maps_are_evaluated_per_map(prep):
    """A grid point may restrict ``layers`` (configs/vision_paper.toml does): when one
    subroutine's chosen point keeps every layer and the other's only some, the base model's
    runs have two unit maps; each run's row equals the row of that run evaluated alone."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.evaluate import RunToEvaluate, evaluate_unit_runs
    from subroutine_circuits.experiment.search import encode, make_mask
    from subroutine_circuits.masks.ablator import reference_ablator
    from subroutine_circuits.models.cnn import HookedCNN

    cfg = tiny_config()
    adapter = as_adapter(HookedCNN(vision.cnn_model_config(cfg, prep.task, 0, "cpu"))).freeze()
    test = {k: encode(adapter, v) for k, v in prep.splits["test"].items()}
    ref = encode(adapter, prep.splits["train"]["composite"]).flat_inputs()
    abl = {k: reference_ablator(adapter, adapter.unit_map(), ref, k) for k in ("zero", "mean")}
    mc = MaskSearchConfig(unit_kinds=("channel", "neuron"))
    masks = [make_mask(adapter, mc, hp, s, abl["mean"]).eval()
             for hp, s in (({}, 0), ({"layers": [2, 3]}, 1), ({}, 2))]  # fmt: skip
    g = torch.Generator().manual_seed(3)
    for m in masks:  # some units kept, some removed
        for part in m.parts:
            part.log_alpha.data = torch.randn(part.log_alpha.shape, generator=g) * 3
    assert masks[0].unit_map.n_units != masks[1].unit_map.n_units
    runs = [RunToEvaluate(s, o, i, m, True, draw_seed=10 + i) for i, (m, s, o) in
            enumerate(zip(masks, ("number", "contact", "number"), ("contact", "number",
                                                                    "contact")))]  # fmt: skip
    rows = evaluate_unit_runs(adapter, runs, test, abl, "mean", 20)
    for r, row in zip(runs, rows):
        alone = evaluate_unit_runs(adapter, [r], test, abl, "mean", 20)[0]
        assert row == pytest.approx(alone, nan_ok=True)
        # the sequential null stops a run at its first draw at or below it (20 draws, alpha 0.05)
        assert row["n_random"] == 20 or (row["randabl_stopped"] and row["randabl_p"] > 0.05)
        assert row["n_kept"] == int(r.mask.flat_binary().sum())


_FAULTS = """
import resource, sys, torch
from subroutine_circuits.experiment import vision
tuned = vision.tune_cpu_allocator() if sys.argv[1] == "1" else False
torch.set_num_threads(1)
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(16, 16), torch.nn.ReLU(),
    torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.GroupNorm(16, 16), torch.nn.ReLU())
x = torch.randn(64, 3, 32, 32)
def step():
    net(x).square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_tuned_allocator_stops_page_faults_of_cnn_passes():
    """With ``tune_cpu_allocator`` the few-MB activations of CNN passes on the CPU are reused
    from the heap: page faults over 5 training passes never rise, and drop by far more than 5x
    where glibc's defaults return the freed blocks to the system (every pass faults them in
    again; measured with AVX-512 kernels, not with AVX2 ones, which fault not at all)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(vision.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    got = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, flag], env=env, check=True,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        got[flag] = (out[0] == "True", int(out[1]))
    if not sys.platform.startswith("linux"):  # not glibc: nothing to tune
        assert not got["1"][0]
        return
    assert got["1"][0] and not got["0"][0]
    assert got["1"][1] <= got["0"][1], got
    # the drop shows only where glibc's defaults fault at all: with oneDNN's AVX2 kernels
    # (ONEDNN_MAX_CPU_ISA=AVX2) the passes' blocks stayed on the heap, 0 faults either way
    if got["0"][1] >= 50:
        assert got["1"][1] * 5 < got["0"][1], got
