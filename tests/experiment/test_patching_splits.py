"""Patching splits (audit finding): the scoring pairs, which choose the circuit, come from the
VALIDATION split; the faithfulness pairs, which measure it, and the cross-ablation stay on the
test split. The two sets are disjoint; thin data in either split warns and goes on."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from subroutine_circuits.experiment.patching import (
    PairShortageWarning,
    PatchingConfig,
    build_pair_data,
    pair_sets,
    run_patching,
)
from subroutine_circuits.tasks import get_task, load_task, split_of
from subroutine_circuits.tasks.base import split_filter

NOUNS = ("author", "pilot", "surgeon", "farmer", "dancer", "senator")
NOUNS += ("teacher", "guard", "singer", "doctor", "lawyer", "driver")
VERBS = ("laughs", "smiles", "swims", "waits", "sleeps", "talks")
RULE = {"subject_plural": False, "verb_plural": False}


def _texts(pairs, contexts: bool = True) -> set[str]:
    """Clean and corrupted texts of (clean, corrupted, contexts) pairs, with the contexts."""
    return {t for c, x, ctx in pairs for t in (c, x, *(ctx if contexts else ()))}


def _shortages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, PairShortageWarning)]


def agreement_rows(drop_split: str | None = None, split_seed: int = 0) -> list[dict]:
    """A Marvin & Linzen-style agreement file (``the author(s) laugh(s)``): ``pair_id`` groups a
    text with its subject-number variant only, so ``subject_plural`` has a few minimal pairs
    per split and ``verb_plural`` none. ``drop_split``: texts of that split left out."""
    rows = []
    for noun, verb in itertools.product(NOUNS, VERBS):
        for subj_pl, verb_pl in itertools.product((False, True), repeat=2):
            text = f"the {noun}{'s' if subj_pl else ''} {verb[:-1] if verb_pl else verb}"
            if drop_split is not None and split_of(text, split_seed) == drop_split:
                continue
            group = f"{noun}-{verb}-{'pl' if verb_pl else 'sg'}"
            rows.append(
                {"text": text, "subject_plural": subj_pl, "verb_plural": verb_pl, "pair_id": group}
            )
    return rows


def _file_task(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return load_task(str(path), RULE)


@pytest.fixture(scope="module")
def thin_task(tmp_path_factory):
    return _file_task(tmp_path_factory.mktemp("splits") / "agree.jsonl", agreement_rows())


@pytest.fixture(scope="module")
def no_val_task(tmp_path_factory):
    """The agreement file without any text of the validation split (seed 0)."""
    return _file_task(tmp_path_factory.mktemp("noval") / "agree.jsonl", agreement_rows("val"))


def _tiny_model(task):
    from subroutine_circuits.models import ModelSpec, make_model

    tok = task.tokenizer()
    model = make_model(ModelSpec(preset="tiny", d_mlp=16), tok.vocab_size, seed=1)
    return model.eval(), tok


# ----------------------------------------------------------------------------- the pair sets


@pytest.mark.parametrize("split_seed", [0, 5])
def test_scoring_pairs_are_val_texts_faithfulness_pairs_test_texts(split_seed):
    """Every clean, corrupted and context text of a scoring pair is a validation text (none a
    test text); every text of a faithfulness pair is a test text; the sets share no text."""
    task = get_task("agreement_singular")
    is_val, is_test = split_filter("val", split_seed), split_filter("test", split_seed)
    cfg = PatchingConfig(n_pairs=20, n_faith_pairs=15, seed=2, split_seed=split_seed)
    assert (cfg.score_split, cfg.split) == ("val", "test")
    for sub in task.predicates:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PairShortageWarning)
            scoring, faith = pair_sets(task, sub, cfg)
        assert (len(scoring), len(faith)) == (20, 15)
        score_t, faith_t = _texts(scoring), _texts(faith)
        assert all(is_val(t) and not is_test(t) for t in score_t)
        assert all(is_test(t) for t in faith_t)
        assert not score_t & faith_t
        # clean / corrupted texts are distinct within each set too
        assert len(_texts(scoring, contexts=False)) == 40
        assert len(_texts(faith, contexts=False)) == 30
        assert pair_sets(task, sub, cfg) == (scoring, faith)  # deterministic


def test_split_settings_are_validated_and_respected():
    """``score_split`` / ``split`` take train, val, test or None (clear errors otherwise);
    the scoring set follows ``score_split``, and one split for both shares it as before."""
    for name in ("score_split", "split"):
        with pytest.raises(ValueError, match=f"{name} must be 'train', 'val', 'test' or None"):
            PatchingConfig(**{name: "dev"})
    task = get_task("agreement_singular")
    train = PatchingConfig(n_pairs=8, score_split="train")
    scoring, faith = pair_sets(task, "verb_plural", train)
    assert {split_of(t, 0) for t in _texts(scoring)} == {"train"}
    assert {split_of(t, 0) for t in _texts(faith)} == {"test"}
    free = PatchingConfig(n_pairs=30, score_split=None)
    assert {split_of(t, 0) for t in _texts(pair_sets(task, "verb_plural", free)[0])} > {"val"}
    same = PatchingConfig(n_pairs=8, score_split="test")
    scoring, faith = pair_sets(task, "verb_plural", same)
    assert {split_of(t, 0) for t in _texts(scoring) | _texts(faith)} == {"test"}
    assert not _texts(scoring, False) & _texts(faith, False)


# ----------------------------------------------------------------------------- thin data


def test_thin_val_split_warns_and_goes_on(thin_task):
    """A validation split with fewer minimal pairs than asked: the scoring set has the val
    pairs found (no test pair fills it up), the faithfulness set the test pairs found, and
    the warning names each set's split and counts."""
    is_val, is_test = split_filter("val", 0), split_filter("test", 0)
    cfg = PatchingConfig(n_pairs=24, n_faith_pairs=24, seed=0)
    with pytest.warns(PairShortageWarning) as record:
        scoring, faith = pair_sets(thin_task, "subject_plural", cfg)
    assert 0 < len(scoring) < 24 and 0 < len(faith) < 24
    assert all(is_val(t) for t in _texts(scoring))
    assert all(is_test(t) for t in _texts(faith))
    (msg,) = _shortages(record)
    assert f"than asked: {len(scoring)} of 24 scoring pairs in the 'val' split" in msg
    assert f"{len(faith)} of 24 faithfulness pairs in the 'test' split" in msg
    assert "scoring pairs in the 'val' split:" in msg and "patching runs with the pairs" in msg
    # the scoring pairs do not depend on the faithfulness request (separate splits)
    fewer = PatchingConfig(n_pairs=24, n_faith_pairs=2, seed=0)
    with pytest.warns(PairShortageWarning):
        assert pair_sets(thin_task, "subject_plural", fewer)[0] == scoring


def test_thin_val_split_is_patched_and_recorded(thin_task):
    """run_patching with a thin validation split runs with the pairs found; the row says
    ``fewer pairs``, the counts, and which split each set came from; the score file's pairs
    are validation (scoring) and test (faithfulness) texts."""
    model, tok = _tiny_model(thin_task)
    cfg = PatchingConfig(
        methods="attribution", n_pairs=24, kinds=("head",), fractions=(0, 1), out_dir=None
    )
    with pytest.warns(PairShortageWarning, match="scoring pairs in the 'val' split"):
        (row,) = run_patching(model, tok, thin_task, "subject_plural", None, None, cfg)
    assert row["status"] == "fewer pairs" and 0 < row["n_pairs"] < 24
    assert (row["score_split"], row["faith_split"]) == ("val", "test")
    assert (row["n_pairs_asked"], row["n_faith_pairs_asked"]) == (24, 24)
    assert not math.isnan(row["cpr"])
    assert "scoring pairs in the 'val' split" in row["pairs_note"]


def test_no_val_pair_skips_the_subroutine(no_val_task):
    """No minimal pair in the validation split: no scoring pair (test pairs are never used
    for scoring), so the subroutine is skipped with a row saying why; the faithfulness pairs
    found in the test split are still counted."""
    cfg = PatchingConfig(n_pairs=6, kinds=("head",), methods=("attribution",), fractions=(0, 1))
    with pytest.warns(PairShortageWarning, match="patching of 'subject_plural' is skipped"):
        scoring, faith = pair_sets(no_val_task, "subject_plural", cfg)
    assert scoring == [] and faith
    assert all(split_of(t, 0) == "test" for t in _texts(faith))
    model, tok = _tiny_model(no_val_task)
    with pytest.warns(PairShortageWarning, match="0 of 6 scoring pairs in the 'val' split"):
        (row,) = run_patching(model, tok, no_val_task, "subject_plural", None, None, cfg)
    assert row["status"] == "skipped" and row["n_pairs"] == 0 and row["n_faith_pairs"] > 0
    assert (row["score_split"], row["faith_split"]) == ("val", "test")
    assert math.isnan(row["cpr"]) and math.isnan(row["f_k"])
    assert "scoring pairs in the 'val' split: none found" in row["pairs_note"]


def test_subword_tokenizer_pairs_keep_their_splits(tmp_path, thin_task):
    """Subword tokenizers (pairs oversampled, the first aligned ones kept): on thin data the
    scoring pairs are still validation pairs and the faithfulness pairs test pairs (no
    sharing across splits), each set's shortage naming its split."""
    pytest.importorskip("transformers")
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment import hf
    from subroutine_circuits.models.hf_build import (
        save_gpt2_folder,
        task_texts,
        train_bpe_tokenizer,
    )

    folder = save_gpt2_folder(tmp_path / "gpt2", train_bpe_tokenizer(task_texts()))
    model, tok = hf.load_hf_model(folder)
    adapter = as_adapter(model, tokenizer=tok).freeze()
    cfg = PatchingConfig(n_pairs=6, kinds=("head",), methods=("attribution",))
    with pytest.warns(PairShortageWarning, match="6 scoring pairs in the 'val' split"):
        scoring, faith = build_pair_data(adapter, tok, thin_task, "subject_plural", cfg)
    assert (scoring.split, faith.split) == ("val", "test")
    assert 0 < scoring.n_pairs < 6 and 0 < faith.n_pairs < 6
    score_t = {t for pair in scoring.texts for t in pair}
    faith_t = {t for pair in faith.texts for t in pair}
    assert {split_of(t, 0) for t in score_t} == {"val"}
    assert {split_of(t, 0) for t in faith_t} == {"test"}
    assert scoring.shortage.startswith("scoring pairs in the 'val' split")
    assert faith.shortage.startswith("faithfulness pairs in the 'test' split")


# ----------------------------------------------------------------------------- run_patching


def test_run_patching_scores_on_val_and_measures_on_test(tmp_path):
    """End to end on a tiny model: the pairs patched to choose the circuit (score file
    ``pairs_scoring``) are validation texts, those measuring it test texts, disjoint; the
    cross-ablation runs on the test partitions given."""
    from subroutine_circuits.adapters import tl_unit_map
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.tasks import make_problems

    task = get_task("agreement_singular")
    model, tok = _tiny_model(task)
    kinds = ["partition_subject_plural", "partition_verb_plural"]
    test = {k: make_problems(task, k, 8, i, split="test", seed=3) for i, k in enumerate(kinds)}
    um = tl_unit_map(model, kinds=("head",))
    keep = torch.zeros(um.n_units, dtype=torch.bool)
    keep[[1, 6]] = True
    cfg = PatchingConfig(
        methods="attribution", n_pairs=5, n_faith_pairs=4, seed=1, split_seed=3,
        kinds=("head",), fractions=(0, 0.5, 1), out_dir=str(tmp_path),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", PairShortageWarning)
        (row,) = run_patching(
            model, tok, task, "subject_plural", test, UnitMask.fixed(um, keep), cfg
        )
    assert (row["score_split"], row["faith_split"], row["status"]) == ("val", "test", "ok")
    assert (row["n_pairs"], row["n_faith_pairs"]) == (5, 4)
    saved = torch.load(tmp_path / row["scores_file"], weights_only=False)
    score_t = {t for pair in saved["pairs_scoring"] for t in pair}
    faith_t = {t for pair in saved["pairs_faithfulness"] for t in pair}
    assert len(score_t) == 10 and len(faith_t) == 8 and not score_t & faith_t
    assert {split_of(t, 3) for t in score_t} == {"val"}
    assert {split_of(t, 3) for t in faith_t} == {"test"}
    assert saved["row"]["score_split"] == "val"
    assert 0 <= row["abl_target_acc"] <= 1 and 0 <= row["abl_other_acc"] <= 1
    # build_pair_data records the split of each set
    scoring, faith = build_pair_data(model, tok, task, "subject_plural", cfg)
    assert (scoring.split, faith.split) == ("val", "test")
    assert {t for pair in scoring.texts for t in pair} == score_t
