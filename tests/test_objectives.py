"""Objectives on prompt pairs (issue 24): the logit difference against a hand-written hook, a
planted model whose logit difference lives in known units (mask search, patching and the
ablation with random controls recover them), prompt-pair checks, and the one-call comparison
on a built-in causal model pretrained on agreement."""

from __future__ import annotations

import pytest
import torch

from subroutine_circuits import (
    KLToFull,
    LogitDiff,
    PairMetric,
    PromptPairs,
    ablate_circuit,
    build_model,
    compare_circuits,
    find_circuit,
    get_task,
    pretrain_model,
    prompt_pairs,
)
from subroutine_circuits.groundtruth.planted_pairs import build_planted_pairs
from subroutine_circuits.masks import UnitMask
from subroutine_circuits.patching.compare import roc_auc
from tests.hf_fixtures import *  # noqa: F403  (pytest fixtures: gpt2_folder, ...)


@pytest.fixture(scope="module")
def planted():
    return build_planted_pairs(seed=3)


def _hand_logit_diff(model, pairs, keep, unit_map):
    """The logit difference with the units outside ``keep`` on their corrupted activation,
    written with TransformerLens hooks directly (no library masks)."""
    _, cache = model.run_with_cache(pairs.corrupted)
    hooks = []
    start = 0
    for g in unit_map.groups:
        drop = ~keep[start : start + g.size]
        start += g.size

        def fn(act, hook, drop=drop, name=g.hook_name):
            act = act.clone()
            act[:, :, drop] = cache[name][:, :, drop]
            return act

        hooks.append((g.hook_name, fn))
    logits = model.run_with_hooks(pairs.clean, fwd_hooks=hooks)
    last = logits[torch.arange(len(pairs)), pairs.positions]
    return last.gather(1, pairs.answer[:, None]).squeeze(1) - last.gather(
        1, pairs.wrong[:, None]
    ).squeeze(1)


def test_logit_diff_matches_a_hand_written_hook(planted):
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        keep = torch.rand(planted.unit_map.n_units, generator=gen) < 0.5
        mask = UnitMask.fixed(planted.unit_map, keep, "resample")
        ours = LogitDiff().values(planted.model, planted.pairs, mask)
        hand = _hand_logit_diff(planted.model, planted.pairs, keep, planted.unit_map)
        torch.testing.assert_close(ours, hand, rtol=1e-4, atol=1e-4)


def test_planted_truth_is_exact(planted):
    """The planted set alone keeps the full logit difference; removing it gives the corrupted
    one; every planted unit matters."""
    res = ablate_circuit(planted.model, planted.truth, planted.pairs, n_random=20)
    assert res["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert res["removed_faithfulness"] == pytest.approx(0.0, abs=1e-4)
    assert res["p_sufficient"] == pytest.approx(1 / 21)
    assert min(planted.effects.values()) > 0.1


def test_mask_and_patching_recover_planted_units_under_logit_diff(planted):
    mask = find_circuit(planted.model, planted.pairs, steps=200, seed=0)
    from subroutine_circuits.experiment.patching import mask_unit_params

    assert mask.meta["objective"] == "logit_diff"
    assert roc_auc(mask_unit_params(mask), planted.truth) >= 0.95
    res = compare_circuits(planted.model, planted.pairs, mask=mask, n_random=20)
    for method in ("activation", "attribution"):
        assert roc_auc(res.scores[method].abs(), planted.truth) >= 0.95
    table = res.table().set_index("method")
    assert set(table.index) == {"mask", "activation", "attribution", "random"}
    # the frontier measures the metric of the same objective: full model = the mean LD
    full = float(LogitDiff().values(planted.model, planted.pairs).mean())
    assert res.frontier.m_full == pytest.approx(full, rel=1e-4)
    assert table.loc["mask", "cpr"] > table.loc["random", "cpr"]


def test_other_objectives(planted):
    n = planted.unit_map.n_units
    everything = UnitMask.fixed(planted.unit_map, torch.ones(n, dtype=torch.bool), "resample")
    assert KLToFull().score(planted.model, planted.pairs, everything) == 1.0
    assert float(KLToFull().values(planted.model, planted.pairs, everything).abs().max()) < 1e-5
    user = PairMetric(lambda logits, p: logits[..., 0] - logits[..., 1], name="a_minus_b")
    assert user.values(planted.model, planted.pairs).shape == (len(planted.pairs),)
    with pytest.raises(ValueError, match="one value per pair"):
        PairMetric(lambda logits, p: logits.sum()).values(planted.model, planted.pairs)


def test_prompt_pairs_are_checked():
    task = get_task("agreement_singular")
    model = build_model(task, preset="tiny", seed=0)
    texts = task.prompt_pairs(4, seed=0)
    pairs = prompt_pairs(model, texts)
    tok = model.tokenizer
    assert isinstance(pairs, PromptPairs) and len(pairs) == 4
    for j, (clean, corr, ans, wrong) in enumerate(texts):
        ids = tok.encode(clean, add_bos=True, add_eos=False)
        assert pairs.clean[j, : len(ids)].tolist() == ids
        assert int(pairs.positions[j]) == len(ids) - 1
        assert int(pairs.answer[j]) == tok.token_to_id(ans)
        assert int(pairs.wrong[j]) == tok.token_to_id(wrong)
        assert ans != wrong and clean != corr
    with pytest.raises(ValueError, match="align token by token"):
        prompt_pairs(model, [("the dog", "the big dog", "runs", "run")])
    with pytest.raises(ValueError, match="one"):
        prompt_pairs(model, [("the dog", "the dogs", "runs fast", "run")])
    encoder = build_model(task, preset="tiny", attention="bidirectional", seed=0)
    with pytest.raises(ValueError, match="bidirectional"):
        prompt_pairs(encoder, texts)


def test_compare_in_one_call_on_a_model_pretrained_on_agreement():
    """A built-in causal model pretrained (next token) on the agreement corpus: a mask found
    under logit difference and activation patching under the same metric, in one call."""
    task = get_task("agreement_singular")
    model = build_model(task, preset="tiny", seed=0)
    pretrain_model(model, task, steps=600, seed=0)
    pairs = prompt_pairs(model, task.prompt_pairs(96, seed=1))
    full = LogitDiff().values(model, pairs)
    assert float((full > 0).float().mean()) > 0.8  # it learned agreement
    res = compare_circuits(model, pairs, methods=("activation",), steps=120, n_random=20)
    assert res.mask.meta["objective"] == "logit_diff"
    assert res.frontier.m_full == pytest.approx(float(full.mean()), rel=1e-4)
    rows = res.table().set_index("method")
    assert {"mask", "activation", "random"} <= set(rows.index)
    assert ((rows["cpr"] >= 0) & (rows["cpr"] <= 1)).all()
    assert 0 <= res.ablation["p_sufficient"] <= 1
    assert res.ablation["k"] == int(res.mask.flat_binary().sum())


def test_weak_contrast_is_named(planted):
    """Pairs whose corruption barely moves the metric: normalised faithfulness is noise, and
    the ablation says so."""
    p = planted.pairs
    corrupted = p.clean.clone()
    corrupted[0] = p.corrupted[0]  # one pair of 96 differs
    weak = PromptPairs(p.clean, corrupted, p.positions, p.answer, p.wrong)
    with pytest.warns(UserWarning, match="dominated by noise"):
        ablate_circuit(planted.model, planted.truth, weak, n_random=5)


def test_hugging_face_model_in_memory(gpt2_folder):
    """A model loaded from a Hugging Face folder (TransformerBridge on TransformerLens 4,
    HookedTransformer on 3.9): pairs as token ids, the comparison in one call, the circuit
    file round trip (identical ablation)."""
    import warnings

    from subroutine_circuits import export_circuit, import_circuit, load_model

    model = load_model(gpt2_folder, device="cpu")
    assert model.causal
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.model.cfg.d_vocab)
    ids = [
        (torch.randint(5, vocab, (7,), generator=gen).tolist(),
         torch.randint(5, vocab, (7,), generator=gen).tolist(), 3, 4)
        for _ in range(24)
    ]  # fmt: skip
    pairs = prompt_pairs(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model: weak contrast, budget-limited mask
        res = compare_circuits(model, pairs, methods=("activation",), steps=20, n_random=5)
        full = float(LogitDiff().values(model, pairs).mean())
        assert res.frontier.m_full == pytest.approx(full, rel=1e-4, abs=1e-6)
        path = export_circuit(res.mask, gpt2_folder.parent / "ld_circuit.json", model=model)
        again = ablate_circuit(model, import_circuit(path), pairs, n_random=5)
    assert again["faithfulness"] == res.ablation["faithfulness"]
    assert again["k"] == res.ablation["k"]


def test_heads_only_keep_vectors_and_no_controls(planted):
    """A mask over heads only; a circuit given as a keep vector; no random controls."""
    mask = find_circuit(planted.model, planted.pairs, unit_kinds=("head",), steps=60)
    assert mask.flat_binary().numel() == sum(
        g.size for g in planted.unit_map.groups if g.kind == "head"
    )
    res = ablate_circuit(planted.model, planted.truth, planted.pairs, n_random=0)
    assert res["n_random"] == 0 and res["p_sufficient"] == 1.0
    assert res["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    cmp = compare_circuits(
        planted.model, planted.pairs, mask=planted.truth, methods=("attribution",), n_random=0
    )
    assert cmp.ablation["k"] == int(planted.truth.sum())
    assert {r["method"] for r in cmp.summary} == {"mask", "attribution", "random"}
    with pytest.raises(ValueError, match="unknown patching methods"):
        compare_circuits(planted.model, planted.pairs, mask=planted.truth, methods=("ig",))
    with pytest.raises(ValueError, match="options"):
        compare_circuits(planted.model, planted.pairs, mask=planted.truth, steps=3)
