"""run_patching on a tiny OOO model and the ``patch`` command, checked against direct
computations with the models/masks readouts."""

from __future__ import annotations

import argparse
import math

import pandas as pd
import pytest
import torch
from scipy import stats

from subroutine_circuits.experiment.patching import (
    PatchingConfig,
    cross_ablation,
    pair_sets,
    run_patching,
)
from subroutine_circuits.patching.compare import roc_auc


@pytest.fixture(scope="module")
def setup():
    from subroutine_circuits.adapters import tl_unit_map
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.models import ModelSpec, make_model
    from subroutine_circuits.tasks import get_task, make_problems

    task = get_task("agreement_singular")
    tok = task.tokenizer()
    model = make_model(ModelSpec(preset="tiny", d_mlp=16), tok.vocab_size, seed=1)
    model.eval()
    kinds = ["partition_subject_plural", "partition_verb_plural", "sub_subject_plural"]
    test = {k: make_problems(task, k, 12, i) for i, k in enumerate(kinds)}
    um = tl_unit_map(model, kinds=("head",))
    keep = torch.zeros(um.n_units, dtype=torch.bool)
    keep[[1, 6]] = True
    mask = UnitMask.fixed(um, keep)
    return task, tok, model, test, um, mask


def _oddness(model, tok, texts):
    """Score of texts[0] among texts (independent: padded batch + models.ooo_scores)."""
    from subroutine_circuits.models import final_hidden, ooo_scores

    toks, lens = tok.encode_batch(texts)
    emb = final_hidden(model, torch.as_tensor(toks), torch.as_tensor(lens))
    return float(ooo_scores(emb[None])[0, 0])


def test_run_patching_ooo(setup, tmp_path):
    task, tok, model, test, um, mask = setup
    cfg = PatchingConfig(n_pairs=4, seed=3, out_dir=str(tmp_path), fractions=(0, 0.25, 0.5, 1))
    rows = run_patching(model, tok, task, "subject_plural", test, mask, cfg)
    assert [r["method"] for r in rows] == ["activation", "attribution"]
    pairs = pair_sets(task, "subject_plural", cfg)[0]  # the scoring pairs
    m_clean = sum(_oddness(model, tok, [c] + ctx) for c, _, ctx in pairs) / 4
    m_corr = sum(_oddness(model, tok, [x] + ctx) for _, x, ctx in pairs) / 4
    act = rows[0]
    assert act["clean_metric"] == pytest.approx(m_clean, abs=1e-4)
    assert act["corr_metric"] == pytest.approx(m_corr, abs=1e-4)

    # activation score of head (layer 1, head 2) by a hand-written patch per pair
    saved = torch.load(tmp_path / act["scores_file"])
    scores = saved["scores"]
    assert scores.shape == (um.n_units,)
    hook = "blocks.1.attn.hook_z"
    total = 0.0
    for c, x, ctx in pairs:
        _, cache = model.run_with_cache(torch.tensor([tok.encode(c)]))

        def patch(z, hook, cache=cache):
            z = z.clone()
            z[:, :, 2] = cache[hook.name][:, :, 2]
            return z

        model.add_hook(hook, patch)
        try:
            # contexts must stay unpatched: compute the patched stimulus alone
            from subroutine_circuits.models import final_hidden

            e_x = final_hidden(
                model, torch.tensor([tok.encode(x)]), torch.tensor([len(tok.encode(x))])
            )
        finally:
            model.reset_hooks()
        toks, lens = tok.encode_batch(ctx)
        e_c = final_hidden(model, torch.as_tensor(toks), torch.as_tensor(lens))
        xn = torch.nn.functional.normalize(e_x[0], dim=-1)
        cn = torch.nn.functional.normalize(e_c, dim=-1)
        total += float(-(cn @ xn).sum())
    expected = (total / 4 - m_corr) / (m_clean - m_corr)
    assert float(scores[4 + 2]) == pytest.approx(expected, abs=1e-3)

    # comparison with the mask: Jaccard of the top-2 heads with {1, 6}
    top = set(torch.argsort(-scores.abs(), stable=True)[:2].tolist())
    assert act["k"] == 2 and act["mask_k"] == 2
    # f_k: the top-2 circuit's faithfulness, independently from the curve code's pieces
    from subroutine_circuits.experiment.patching import build_pair_data
    from subroutine_circuits.patching.circuits import circuit_metrics

    _, faith = build_pair_data(model, tok, task, "subject_plural", cfg)

    groups = um.groups
    ends = torch.stack(
        [saved["circuit"], torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)]
    )
    # measured on the faithfulness pairs, not on the scoring pairs that chose the circuit
    m = circuit_metrics(model, faith.batches, groups, ends, "resample", faith.readout)
    assert act["f_k"] == pytest.approx(float((m[0] - m[2]) / (m[1] - m[2])), abs=1e-5)
    assert act["jaccard"] == pytest.approx(len(top & {1, 6}) / len(top | {1, 6}))
    keep = mask.flat_binary()
    assert act["roc_auc"] == pytest.approx(roc_auc(scores.abs(), keep))
    assert act["spearman"] == pytest.approx(
        stats.spearmanr(scores.abs().numpy(), keep.float().numpy()).statistic
    )

    # cross-ablation: zero-ablating the top-2 heads, accuracies via models.ooo_accuracy
    from subroutine_circuits.models import ooo_accuracy

    circuit = saved["circuit"]

    def zero(z, hook):
        layer = int(hook.name.split(".")[1])
        z = z.clone()
        for h in range(4):
            if circuit[4 * layer + h]:
                z[:, :, h] = 0
        return z

    for n in ("blocks.0.attn.hook_z", "blocks.1.attn.hook_z"):
        model.add_hook(n, zero)
    try:
        t = ooo_accuracy(model, test["partition_subject_plural"], tok)
        o = ooo_accuracy(model, test["partition_verb_plural"], tok)
    finally:
        model.reset_hooks()
    assert act["abl_target_acc"] == pytest.approx(t)
    assert act["abl_other_acc"] == pytest.approx(o)
    # accuracy curve over ablated circuit sizes: k = 0 is the unablated model
    curve = saved["faithfulness"]
    assert curve["k"][0] == 0 and curve["k"] == sorted(curve["k"])
    assert curve["target_acc"][0] == pytest.approx(
        ooo_accuracy(model, test["partition_subject_plural"], tok)
    )
    assert saved["subroutine"] == "subject_plural" and saved["method"] == "activation"
    for r in rows:
        for key in ("cpr", "cmd", "k_faithful", "roc_auc", "jaccard", "spearman"):
            assert key in r


def test_run_patching_without_mask_and_bad_input(setup):
    task, tok, model, test, um, mask = setup
    cfg = PatchingConfig(methods="attribution", n_pairs=4, kinds=("head",), fractions=(0, 1))
    rows = run_patching(model, tok, task, "verb_plural", None, None, cfg)
    assert len(rows) == 1 and math.isnan(rows[0]["jaccard"]) and math.isnan(rows[0]["abl_diff"])
    assert rows[0]["k"] == rows[0]["k_faithful"]
    with pytest.raises(ValueError, match="unknown subroutine"):
        run_patching(model, tok, task, "colour", None, None, cfg)
    with pytest.raises(ValueError, match="unknown patching method"):
        PatchingConfig(methods="activation,magic")


def test_cmd_patch_writes_csv(setup, tmp_path):
    from subroutine_circuits.experiment.cli import cmd_patch
    from subroutine_circuits.masks import save_mask
    from subroutine_circuits.models import save_checkpoint

    task, tok, model, test, um, mask = setup
    save_checkpoint(tmp_path / "model", model, tok, {"task": task.name})
    save_mask(tmp_path / "mask.pt", mask, model, {})
    args = argparse.Namespace(
        model_dir=str(tmp_path / "model"),
        task="agreement_singular",
        out=str(tmp_path / "out"),
        mask=[f"subject_plural={tmp_path / 'mask.pt'}"],
        methods="activation,attribution",
        n=2,
        seed=0,
        device="cpu",
    )
    assert cmd_patch(args) == 0
    df = pd.read_csv(tmp_path / "out" / "patching.csv")
    assert len(df) == 4
    assert set(df["method"]) == {"activation", "attribution"}
    assert set(df["subroutine"]) == {"subject_plural", "verb_plural"}
    sub = df[df["subroutine"] == "subject_plural"]
    assert (sub["k"] == 2).all() and sub["jaccard"].notna().all()
    assert df["abl_target_acc"].between(0, 1).all()
    agreement = pd.read_csv(tmp_path / "out" / "agreement.csv")
    assert set(agreement["subroutine"]) == {"subject_plural"}  # the only subroutine with a mask
    assert set(agreement["scope"]) == {"pooled", "kind", "kind_layer"}
    assert set(agreement["method"]) == {"activation", "attribution"}
    fr = pd.read_csv(tmp_path / "out" / "frontier.csv")
    methods = fr.groupby("subroutine")["method"].unique().map(set).to_dict()
    assert methods["subject_plural"] == {
        "mask",
        "activation",
        "attribution",
        "random",
        "chosen mask",
    }
    assert methods["verb_plural"] == {"activation", "attribution", "random"}  # no mask given
    point = fr[fr["kind"] == "point"].iloc[0]
    assert point["k"] == 2 and 0 <= point["accuracy"] <= 1
    with pytest.raises(ValueError, match="unknown subroutine"):
        cmd_patch(argparse.Namespace(**{**vars(args), "mask": ["colour=x.pt"]}))


def test_run_patching_label_readout(setup):
    """Label-token readout: the metric is logit[yes] - logit[no] at the last position."""
    task, tok, model, test, um, mask = setup
    cfg = PatchingConfig(
        methods="activation", readout="label", n_pairs=3, kinds=("head",), fractions=(0, 1)
    )
    rows = run_patching(model, tok, task, "subject_plural", None, None, cfg)
    pairs = pair_sets(task, "subject_plural", cfg)[0]

    def diff(text):
        logits = model(torch.tensor([tok.encode(text)]))[0, -1]
        return float(logits[tok.yes_id] - logits[tok.no_id])

    assert rows[0]["clean_metric"] == pytest.approx(sum(diff(c) for c, _, _ in pairs) / 3, abs=1e-4)
    assert rows[0]["corr_metric"] == pytest.approx(sum(diff(x) for _, x, _ in pairs) / 3, abs=1e-4)


# ----------------------------------------------------------------------------- data hygiene


def _problem_texts(problems) -> set[str]:
    return {t for p in problems for t in p.stimuli}


def test_patching_pairs_come_from_val_and_test_splits_and_are_disjoint():
    """Every scoring text is a validation-split text and every faithfulness text a test-split
    text (never a training text of the study's splits, nor a text of the other evaluation
    split), and the scoring and faithfulness pairs share no clean or corrupted text."""
    from subroutine_circuits.tasks import get_task, make_splits, split_of

    task = get_task("agreement_singular")
    for split_seed in (0, 5):
        cfg = PatchingConfig(n_pairs=20, n_faith_pairs=15, seed=2, split_seed=split_seed)
        scoring, faith = pair_sets(task, "subject_plural", cfg)
        assert (len(scoring), len(faith)) == (20, 15)
        score_t = {t for c, x, ctx in scoring for t in (c, x, *ctx)}
        faith_t = {t for c, x, ctx in faith for t in (c, x, *ctx)}
        assert all(split_of(t, split_seed) == "val" for t in score_t)
        assert all(split_of(t, split_seed) == "test" for t in faith_t)
        splits = make_splits(task, 40, seed=split_seed, split_sizes=(40, 20, 20))
        seen = {k: set().union(*map(_problem_texts, splits[k].values())) for k in splits}
        assert not score_t & (seen["train"] | seen["test"])
        assert not faith_t & (seen["train"] | seen["val"])
        a = {t for c, x, _ in scoring for t in (c, x)}
        b = {t for c, x, _ in faith for t in (c, x)}
        assert not a & b and len(a) == 40 and len(b) == 30  # distinct within each set too
        # deterministic
        assert pair_sets(task, "subject_plural", cfg) == (scoring, faith)
    # no restriction when asked
    free = PatchingConfig(n_pairs=30, split=None, score_split=None)
    for pairs in pair_sets(task, "verb_plural", free):
        texts = {t for c, x, _ in pairs for t in (c, x)}
        assert len({split_of(t, 0) for t in texts}) > 1
    for name in ("split", "score_split"):
        with pytest.raises(ValueError, match=name):
            PatchingConfig(**{name: "dev"})


def test_cross_ablation_mean_uses_reference_position_aware(setup):
    """Mean cross-ablation: means over the REFERENCE problems (training composite), separately
    for the readout (last) position and the other positions; checked against hand-written hooks
    that run every stimulus alone."""
    from subroutine_circuits.models import final_hidden
    from subroutine_circuits.tasks import make_problems

    task, tok, model, test, um, mask = setup
    reference = make_problems(task, "composite", 10, 99, split="train")
    circuit = torch.zeros(um.n_units, dtype=torch.bool)
    circuit[[0, 5, 7]] = True  # L0H0, L1H1, L1H3
    cfg = PatchingConfig(cross_ablation="mean", batch_size=7)
    got = cross_ablation(
        model, tok, um, circuit, test, "subject_plural", "verb_plural", cfg, reference
    )[0]

    # hand: per-head mean of hook_z over readout positions and over other positions
    z_ro = {la: [] for la in range(2)}
    z_other = {la: [] for la in range(2)}
    for p in reference:
        for text in p.stimuli:
            _, cache = model.run_with_cache(torch.tensor([tok.encode(text)]))
            for la in range(2):
                z = cache[f"blocks.{la}.attn.hook_z"][0]  # [pos, head, d_head]
                z_ro[la].append(z[-1:])
                z_other[la].append(z[:-1])
    mean_ro = {la: torch.cat(z_ro[la]).mean(0) for la in range(2)}
    mean_other = {la: torch.cat(z_other[la]).mean(0) for la in range(2)}

    def ablate(z, hook):
        la = int(hook.name.split(".")[1])
        z = z.clone()
        for h in range(4):
            if circuit[4 * la + h]:
                z[0, :-1, h] = mean_other[la][h]
                z[0, -1, h] = mean_ro[la][h]
        return z

    def accuracy(problems):
        correct = 0
        for p in problems:
            embs = []
            for text in p.stimuli:
                toks = torch.tensor([tok.encode(text)])
                hooks = [(f"blocks.{la}.attn.hook_z", ablate) for la in range(2)]
                with model.hooks(fwd_hooks=hooks):
                    e = final_hidden(model, toks, torch.tensor([toks.shape[1]]))
                embs.append(torch.nn.functional.normalize(e[0].float(), dim=-1))
            x = torch.stack(embs)
            sim = x @ x.T
            scores = -(sim.sum(1) - sim.diagonal())
            correct += int(int(scores.argmax()) == p.odd_index)
        return correct / len(problems)

    assert got["abl_target_acc"] == pytest.approx(accuracy(test["partition_subject_plural"]))
    assert got["abl_other_acc"] == pytest.approx(accuracy(test["partition_verb_plural"]))
    with pytest.raises(ValueError, match="reference"):
        cross_ablation(model, tok, um, circuit, test, "subject_plural", "verb_plural", cfg)
    # the study passes its own reference ablator (same set, position-aware): same values
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.patching import ablation_base
    from subroutine_circuits.experiment.search import encode
    from subroutine_circuits.masks.ablator import reference_ablator

    adapter = as_adapter(model, tokenizer=tok)
    flat = encode(adapter, reference).flat_inputs()
    abl = reference_ablator(adapter, um, flat, "mean")
    via = cross_ablation(model, tok, um, circuit, test, "subject_plural", "verb_plural", cfg, abl)
    assert via[0] == got
    a, b = ablation_base(adapter, um, "mean", abl), ablation_base(adapter, um, "mean", reference)
    for h in b.ablation_values:
        assert torch.equal(a.ablation_values[h], b.ablation_values[h].cpu())
        assert torch.equal(a.readout_values[h], b.readout_values[h].cpu())
    with pytest.raises(ValueError, match="reference ablator is 'zero'"):
        ablation_base(adapter, um, "mean", reference_ablator(adapter, um, flat, "zero"))


def test_agreement_rows_per_kind_in_score_file(setup, tmp_path):
    """The score file's agreement table: per kind and per layer, with a pooled reference row;
    the head row's Jaccard equals the top-k overlap computed among heads only."""
    from subroutine_circuits.adapters import tl_unit_map
    from subroutine_circuits.masks import UnitMask

    task, tok, model, test, _, _ = setup
    um = tl_unit_map(model)  # heads and neurons
    kinds = [u[1] for u in um.units()]
    keep = torch.zeros(um.n_units, dtype=torch.bool)
    heads = [i for i, k in enumerate(kinds) if k == "head"]
    neurons = [i for i, k in enumerate(kinds) if k == "neuron"]
    keep[[heads[1], heads[6], neurons[3], neurons[20]]] = True
    m = UnitMask.fixed(um, keep)
    cfg = PatchingConfig(methods="attribution", n_pairs=4, out_dir=str(tmp_path), fractions=(0, 1))
    (row,) = run_patching(model, tok, task, "subject_plural", None, m, cfg)
    saved = torch.load(tmp_path / row["scores_file"], weights_only=False)
    ag = pd.DataFrame(saved["agreement"])
    assert set(ag["scope"]) == {"pooled", "kind", "kind_layer"}
    s = saved["scores"].abs()
    for kind, idx in (("head", heads), ("neuron", neurons)):
        r = ag[(ag["scope"] == "kind") & (ag["kind"] == kind)].iloc[0]
        sub = s[idx]
        kk = int(keep[idx].sum())
        top = {idx[i] for i in torch.argsort(-sub, stable=True)[:kk].tolist()}
        kept = {i for i in idx if keep[i]}
        assert r["k"] == kk and r["n_units"] == len(idx)
        assert r["jaccard"] == pytest.approx(len(top & kept) / len(top | kept))
        assert 0 < r["expected_jaccard"] < 1 and 0 <= r["auc"] <= 1
    layers = ag[(ag["scope"] == "kind_layer")]
    assert len(layers) == 2 * 2  # (head, neuron) x 2 layers
    # the pooled row equals patching.csv's pooled Jaccard
    pooled = ag[ag["scope"] == "pooled"].iloc[0]
    assert pooled["jaccard"] == pytest.approx(row["jaccard"])


def test_study_patching_uses_val_and_test_texts_and_writes_agreement(tmp_path):
    """End to end: the study's patching stage draws its scoring texts from the validation split
    and its faithfulness texts from the test split (none a training text of the study's own
    splits), keeps the two sets disjoint, and the folder gets agreement.csv (per kind and
    layer) and a base-model summary.csv."""
    from subroutine_circuits.experiment import config_from_dict, run_experiment
    from subroutine_circuits.experiment.data import prepare
    from subroutine_circuits.tasks import split_of

    cfg = config_from_dict(
        {
            "task": "agreement_singular",
            "inits": ["trained"],
            "base_seeds": [0],
            "mask_seeds": [0],
            "min_composite_acc": 0.0,
            "patching_methods": ["attribution"],
            "patching_pairs": 6,
            "patching_inits": ["trained"],
            "data": {"n_train": 60, "n_val": 20, "n_test": 20, "corpus_size": 100, "seed": 3},
            "train": {"max_steps": 20, "eval_every": 10},
            "mask": {"steps": 20, "lr": 0.1, "init": 1.0, "grid": [{"l0_weight": 4.0}]},
        }
    )
    run_experiment(cfg, tmp_path, progress=False)
    prep = prepare(cfg)
    seen = {k: set().union(*map(_problem_texts, v.values())) for k, v in prep.splits.items()}
    files = sorted((tmp_path / "patching").glob("scores_*.pt"))
    assert len(files) == 2  # one method x two subroutines
    for f in files:
        obj = torch.load(f, weights_only=False)
        score_t = {t for pair in obj["pairs_scoring"] for t in pair}
        faith_t = {t for pair in obj["pairs_faithfulness"] for t in pair}
        assert len(obj["pairs_scoring"]) == len(obj["pairs_faithfulness"]) == 6
        assert not score_t & faith_t
        assert {split_of(t, 3) for t in score_t} == {"val"}
        assert {split_of(t, 3) for t in faith_t} == {"test"}
        assert not score_t & (seen["train"] | seen["test"])
        assert not faith_t & (seen["train"] | seen["val"])
        assert obj["mask_seed"] == 0
    agreement = pd.read_csv(tmp_path / "agreement.csv")
    assert {"scope", "kind", "layer", "expected_jaccard", "spearman_p", "auc_p"} <= set(
        agreement.columns
    )
    assert set(agreement.loc[agreement["scope"] == "kind", "kind"]) == {"head", "neuron"}
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"n_base_models", "base_models_compositional", "p_value", "p_holm"} <= set(
        summary.columns
    )
    patching = pd.read_csv(tmp_path / "patching.csv")
    assert (patching["cross_ablation"] == cfg.ablation).all()
    assert "section unavailable" not in (tmp_path / "report.html").read_text(encoding="utf-8")
