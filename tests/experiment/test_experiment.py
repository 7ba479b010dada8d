"""End-to-end tests of the experiment runner on a very small configuration.

One small experiment is run once per test session (module-scoped fixture) and then checked:
an ablation-matrix cell recomputed by hand, resumption after an interruption, and the outputs.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from subroutine_circuits.experiment import config_from_dict, run_experiment


def small_config(**extra) -> dict:
    """A configuration that runs in seconds: one trained base model, two mask seeds."""
    cfg = {
        "task": "agreement_singular",
        "inits": ["trained"],
        "base_seeds": [0],
        "mask_seeds": [0, 1],
        "min_composite_acc": 0.0,
        "patching": False,
        "data": {"n_train": 120, "n_val": 40, "n_test": 40, "corpus_size": 200},
        "train": {"max_steps": 60, "eval_every": 30},
        "mask": {"steps": 60, "lr": 0.1, "init": 1.0, "grid": [{"l0_weight": 4.0}]},
        "n_random": 20,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Run the small experiment once; returns (config, output folder, results)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("exp")
    cfg = config_from_dict(small_config())
    df = run_experiment(cfg, out, progress=False)
    return cfg, out, df


def _hand_means(model, tokenizer, problems) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Position-aware means by hand: per hook, the mean activation at the last token and over
    the other tokens of every stimulus of ``problems`` (each run alone, float64)."""
    names = [n for n in model.hook_dict if n.endswith(("attn.hook_z", "mlp.hook_post"))]
    acc = {n: [0.0, 0, 0.0, 0] for n in names}
    with torch.no_grad():
        for p in problems:
            for text in p.stimuli:
                _, cache = model.run_with_cache(
                    torch.tensor([tokenizer.encode(text)]), names_filter=names
                )
                for n in names:
                    a = cache[n][0].double()
                    acc[n][0] += a[-1]
                    acc[n][1] += 1
                    acc[n][2] += a[:-1].sum(0)
                    acc[n][3] += a.shape[0] - 1
    return {n: (v[0] / v[1], v[2] / v[3]) for n, v in acc.items()}


def _by_hand_accuracy(model, tokenizer, problems, ablate_flat, units, means=None) -> float:
    """OOO accuracy with the units in ``ablate_flat`` ablated by plain TransformerLens hooks:
    zeroed, or (``means`` from :func:`_hand_means`) set to their readout / other-position mean.

    Independent of the library's readout and masks: every stimulus runs alone (no padding),
    the hidden state is ln_final of the last block's output at the last token, and the OOO
    score is computed from normalised embeddings in float64.
    """
    from transformer_lens.utilities import get_act_name

    zero: dict[str, list[int]] = {}
    for (layer, kind, idx), ablate in zip(units, ablate_flat.tolist()):
        if ablate:
            name = get_act_name("z", layer) if kind == "head" else get_act_name("post", layer)
            zero.setdefault(name, []).append(idx)

    def make_hook(idxs):
        def hook(act, hook):
            act = act.clone()
            if means is None:
                act[:, :, idxs] = 0.0
            else:
                ro, other = means[hook.name]
                act[:, :-1, idxs] = other[idxs].to(act.dtype)
                act[:, -1, idxs] = ro[idxs].to(act.dtype)
            return act

        return hook

    hooks = [(name, make_hook(idxs)) for name, idxs in zero.items()]
    correct = 0
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for p in problems:
            embs = []
            for text in p.stimuli:
                toks = torch.tensor([tokenizer.encode(text)])
                resid = model(toks, stop_at_layer=model.cfg.n_layers)
                embs.append(model.ln_final(resid)[0, -1].double())
            x = torch.stack(embs)
            x = x / x.norm(dim=-1, keepdim=True)
            gram = x @ x.T
            scores = -(gram.sum(-1) - gram.diagonal())
            correct += int(int(scores.argmax()) == p.odd_index)
    return correct / len(problems)


def test_ablation_cell_recomputed_by_hand(small_run):
    """Load a saved mask, ablate its units with hand-written hooks, re-evaluate: same numbers."""
    from subroutine_circuits.masks import load_mask
    from subroutine_circuits.models import load_checkpoint
    from subroutine_circuits.tasks import get_task, make_splits

    cfg, out, df = small_run
    row = df.iloc[0]
    model, tokenizer, _ = load_checkpoint(out / "models" / f"{row.task}__{row.init}__s0")
    mask = load_mask(out / row.mask_path, model)
    keep = mask.flat_binary().bool()
    units = mask.unit_map.units()
    assert 0 < int(keep.sum()) < len(units)
    splits = make_splits(
        get_task(cfg.task),
        cfg.data.n_train,
        seed=cfg.data.seed,
        split_sizes=(cfg.data.n_train, cfg.data.n_val, cfg.data.n_test),
    )
    target = splits["test"][f"partition_{row.subroutine}"]
    other = splits["test"][f"partition_{row.other}"]
    # subnetwork ablated (zero, a robustness column): the kept units are zeroed
    assert _by_hand_accuracy(model, tokenizer, target, keep, units) == pytest.approx(
        row.ablzero_target_acc, abs=1e-9
    )
    assert _by_hand_accuracy(model, tokenizer, other, keep, units) == pytest.approx(
        row.ablzero_other_acc, abs=1e-9
    )
    # the verdict's ablation: position-aware means over the training composite problems
    assert cfg.ablation == "mean" and row.ablation == "mean"
    means = _hand_means(model, tokenizer, splits["train"]["composite"])
    for problems, col in ((target, "abl_target_acc"), (other, "abl_other_acc")):
        got = _by_hand_accuracy(model, tokenizer, problems, keep, units, means)
        assert got == pytest.approx(row[col], abs=1e-9), col
    # subnetwork alone: everything else mean-ablated
    assert _by_hand_accuracy(model, tokenizer, target, ~keep, units, means) == pytest.approx(
        row.sub_target_acc, abs=1e-9
    )
    # the full model
    none = torch.zeros_like(keep)
    assert _by_hand_accuracy(model, tokenizer, target, none, units) == pytest.approx(
        row.full_target_acc, abs=1e-9
    )


def test_results_columns_and_rows(small_run):
    """One row per base model x mask seed x subroutine, with the documented columns."""
    cfg, out, df = small_run
    on_disk = pd.read_csv(out / "results.csv")
    assert len(on_disk) == len(cfg.mask_seeds) * 2
    for col in [
        "task", "model", "init", "base_seed", "mask_seed", "subroutine", "mask_kind",
        "density", "sub_target_acc", "sub_other_acc", "abl_target_acc", "abl_other_acc",
        "sub_diff", "abl_diff", "randabl_target_acc", "randabl_other_acc", "compositional",
        "margins_ok", "paper_compositional",
    ]:  # fmt: skip
        assert col in on_disk.columns, col
    clipped = on_disk["sub_target_acc"].clip(lower=0.25) - on_disk["sub_other_acc"].clip(lower=0.25)
    assert (clipped - on_disk["sub_diff"]).abs().max() < 1e-12
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["margin"] == cfg.margin
    assert "torch" in manifest["versions"]


def test_interrupted_run_resumes_without_touching_finished_rows(small_run, tmp_path, monkeypatch):
    """Stop after the first finished row; a rerun keeps that row byte-identical and finishes."""
    import subroutine_circuits.store as runner  # the store writes every run file

    cfg, _, _ = small_run
    out = tmp_path / "exp"
    real_write = runner.atomic_write_json
    written = []

    def write_then_interrupt(path, obj):
        real_write(path, obj)
        if "runs" in str(path):
            written.append(path)
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(runner, "atomic_write_json", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, progress=False)
    assert len(written) == 1
    first = written[0]
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    monkeypatch.setattr(runner, "atomic_write_json", real_write)
    df = run_experiment(cfg, out, progress=False)
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert len(df) == len(cfg.mask_seeds) * 2
    assert len(list((out / "runs").glob("*.json"))) == len(df)


def test_bad_config_names_the_problem(tmp_path):
    """Unknown keys, inits and subroutines produce errors that name them."""
    with pytest.raises(ValueError, match="unknown key 'mask_sedes'"):
        config_from_dict({"mask_sedes": [0]})
    with pytest.raises(ValueError, match="unknown init 'pretraind'"):
        config_from_dict({"inits": ["pretraind"]})
    cfg = config_from_dict(small_config(subroutines=["subject_plural", "tense"]))
    with pytest.raises(ValueError, match="unknown subroutine 'tense'"):
        run_experiment(cfg, tmp_path / "bad", progress=False)
    shutil.rmtree(tmp_path / "bad", ignore_errors=True)


def test_every_example_config_loads():
    """The TOML files in configs/ parse and validate (relative data paths resolved)."""
    from pathlib import Path

    from subroutine_circuits.experiment import load_config

    files = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_config(f)
        for task in cfg.task_names():  # a config may list several tasks
            if task.endswith(".jsonl"):
                assert Path(task).is_file(), task


@pytest.mark.parametrize("variant", ["weight_masks", "user_file"])
def test_other_experiment_variants_run(tmp_path, variant):
    """Weight masks (with the re-initialised-weights ablation) and a user's data file run
    end to end and produce consistent rows."""
    from pathlib import Path

    extra: dict = {"mask_seeds": [0]}
    if variant == "weight_masks":
        extra["mask"] = {"kind": "weight", "steps": 30, "lr": 0.1, "grid": [{"l0_weight": 2.0}]}
        extra["ablation"] = "zero"  # weight masks zero their weights
    else:
        data = Path(__file__).resolve().parents[2] / "examples" / "user_task.jsonl"
        extra.update(
            task=str(data),
            rule={"subject_animal": True, "negated": False},
            data={"n_train": 60, "n_val": 12, "n_test": 12},
        )
    cfg = config_from_dict(small_config(**extra))
    df = run_experiment(cfg, tmp_path / variant, progress=False)
    assert len(df) == 2
    assert set(df["mask_kind"]) == {"weight" if variant == "weight_masks" else "unit"}
    if variant == "weight_masks":
        assert df["ablreinit_target_acc"].between(0, 1).all()
    assert df["density"].between(0, 1).all()
    assert (tmp_path / variant / "report.html").is_file()


def test_resuming_with_another_config_is_refused(small_run):
    """A folder written with one configuration cannot be resumed with another."""
    cfg, out, _ = small_run
    other = config_from_dict(small_config(margin=0.1))
    with pytest.raises(ValueError, match="'margin' was 0.05, now 0.1"):
        run_experiment(other, out, progress=False)


def test_own_checkpoint_as_base_model(small_run, tmp_path):
    """A checkpoint saved by the library is the "pretrained" start; "random_init" re-initialises
    the same architecture; a Hugging Face folder gets a clear error."""
    from subroutine_circuits.models import load_checkpoint

    _, out, _ = small_run
    ckpt = out / "models" / "agreement_singular__trained__s0"
    cfg = config_from_dict(
        small_config(
            inits=["pretrained", "random_init"],
            mask_seeds=[0],
            model={"checkpoint": str(ckpt)},
        )
    )
    df = run_experiment(cfg, tmp_path / "ckpt", progress=False)
    assert set(df["init"]) == {"pretrained", "random_init"}
    original, _, meta = load_checkpoint(ckpt)
    fine_tuned, _, _ = load_checkpoint(
        tmp_path / "ckpt" / "models" / "agreement_singular__pretrained__s0"
    )
    random, _, rmeta = load_checkpoint(
        tmp_path / "ckpt" / "models" / "agreement_singular__random_init__s0"
    )
    w = "blocks.0.attn.W_Q"
    assert not torch.equal(original.state_dict()[w], random.state_dict()[w])
    assert rmeta["reinitialised_from"] == str(ckpt)
    # fine-tuning starts from the checkpoint: weights stay close to it, unlike a re-init
    d_ft = (original.state_dict()[w] - fine_tuned.state_dict()[w]).norm()
    d_rand = (original.state_dict()[w] - random.state_dict()[w]).norm()
    assert d_ft < d_rand
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    bad = config_from_dict(small_config(model={"checkpoint": str(hf)}))
    with pytest.raises(ValueError, match="Hugging Face checkpoint"):
        run_experiment(bad, tmp_path / "bad", progress=False)
