"""run_patching on a tiny OOO model and the ``patch`` command, checked against direct
computations with the models/masks readouts."""

from __future__ import annotations

import argparse
import math

import pandas as pd
import pytest
import torch
from scipy import stats

from subroutine_circuits.experiment.patching import PatchingConfig, run_patching, sample_pairs
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
    pairs = sample_pairs(task, "subject_plural", 4, 3)
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

    data = build_pair_data(model, tok, task, "subject_plural", cfg)

    groups = um.groups
    ends = torch.stack(
        [saved["circuit"], torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)]
    )
    m = circuit_metrics(model, data.batches, groups, ends, "resample", data.readout)
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
    with pytest.raises(ValueError, match="unknown subroutine"):
        cmd_patch(argparse.Namespace(**{**vars(args), "mask": ["colour=x.pt"]}))


def test_run_patching_label_readout(setup):
    """Label-token readout: the metric is logit[yes] - logit[no] at the last position."""
    task, tok, model, test, um, mask = setup
    cfg = PatchingConfig(
        methods="activation", readout="label", n_pairs=3, kinds=("head",), fractions=(0, 1)
    )
    rows = run_patching(model, tok, task, "subject_plural", None, None, cfg)
    pairs = sample_pairs(task, "subject_plural", 3, cfg.seed)

    def diff(text):
        logits = model(torch.tensor([tok.encode(text)]))[0, -1]
        return float(logits[tok.yes_id] - logits[tok.no_id])

    assert rows[0]["clean_metric"] == pytest.approx(sum(diff(c) for c, _, _ in pairs) / 3, abs=1e-4)
    assert rows[0]["corr_metric"] == pytest.approx(sum(diff(x) for _, x, _ in pairs) / 3, abs=1e-4)
