"""Thin data (issue 21): a subroutine with fewer minimal pairs in the test split than asked is
patched with the pairs found (their counts in patching.csv, a warning naming the subroutine,
the split and found vs asked); one with none is skipped, never the experiment."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from subroutine_circuits.experiment.patching import (
    PairShortageWarning,
    PatchingConfig,
    pair_sets,
    sample_pairs,
)
from subroutine_circuits.tasks import get_task, load_task
from subroutine_circuits.tasks.base import split_filter

NOUNS = ("author", "pilot", "surgeon", "farmer", "dancer", "senator")
NOUNS += ("teacher", "guard", "singer", "doctor", "lawyer", "driver")
VERBS = ("laughs", "smiles", "swims", "waits", "sleeps", "talks")
RULE = {"subject_plural": False, "verb_plural": False}


def agreement_file(path: Path) -> Path:
    """A Marvin & Linzen-style agreement file: ``the author(s) laugh(s)``, every subject and
    verb number. ``pair_id`` groups a text with its subject-number variant only, so
    ``subject_plural`` has a few minimal pairs in the test split and ``verb_plural`` none."""
    rows = []
    for noun, verb in itertools.product(NOUNS, VERBS):
        for subj_pl, verb_pl in itertools.product((False, True), repeat=2):
            text = f"the {noun}{'s' if subj_pl else ''} {verb[:-1] if verb_pl else verb}"
            group = f"{noun}-{verb}-{'pl' if verb_pl else 'sg'}"
            rows.append(
                {"text": text, "subject_plural": subj_pl, "verb_plural": verb_pl, "pair_id": group}
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def thin_task(tmp_path_factory):
    return load_task(str(agreement_file(tmp_path_factory.mktemp("thin") / "agree.jsonl")), RULE)


def _shortages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, PairShortageWarning)]


# ----------------------------------------------------------------------------- pair sampling


def test_fewer_pairs_are_returned_with_a_warning(thin_task):
    """Asked for 24 pairs of a split that holds a few: those are returned, distinct and from
    the split, with a warning giving found vs asked; the draws are those of a request for
    exactly that many (no warning then)."""
    accept = split_filter("test", 0)
    with pytest.warns(PairShortageWarning) as record:
        pairs = sample_pairs(thin_task, "subject_plural", 24, seed=0, accept=accept, split="test")
    assert 0 < len(pairs) < 24
    (msg,) = _shortages(record)
    assert f"{len(pairs)} of 24 minimal pairs for 'subject_plural' in the 'test' split" in msg
    texts = [t for c, x, _ in pairs for t in (c, x)]
    assert len(set(texts)) == len(texts) and all(accept(t) for t in texts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PairShortageWarning)
        exact = sample_pairs(thin_task, "subject_plural", len(pairs), seed=0, accept=accept)
    assert exact == pairs


def test_no_pair_is_an_empty_result_with_a_warning(thin_task):
    """A subroutine without any minimal pair gives none (a warning says why), not an error."""
    with pytest.warns(PairShortageWarning, match="0 of 8 minimal pairs for 'verb_plural'"):
        assert sample_pairs(thin_task, "verb_plural", 8, seed=0, split="test") == []
    cfg = PatchingConfig(n_pairs=8)
    with pytest.warns(PairShortageWarning, match="patching of 'verb_plural' is skipped"):
        assert pair_sets(thin_task, "verb_plural", cfg) == ([], [])


def test_pair_sets_share_the_pairs_found(thin_task):
    """Scoring and faithfulness pairs from ONE split share what it holds in the asked ratio,
    stay disjoint, and the warning names the subroutine, the split and both found counts
    (separate splits: tests/experiment/test_patching_splits.py)."""
    cfg = PatchingConfig(n_pairs=24, n_faith_pairs=24, seed=0, score_split="test")
    with pytest.warns(PairShortageWarning) as record:
        scoring, faith = pair_sets(thin_task, "subject_plural", cfg)
    found = len(scoring) + len(faith)
    assert 2 <= found < 48 and len(scoring) == math.floor(found / 2 + 0.5) and faith
    (msg,) = _shortages(record)
    assert "'subject_plural'" in msg and "'test' split" in msg
    assert f"{len(scoring)} of 24 scoring pairs, {len(faith)} of 24 faithfulness pairs" in msg
    a = {t for c, x, _ in scoring for t in (c, x)}
    b = {t for c, x, _ in faith for t in (c, x)}
    assert not a & b
    assert pair_sets(thin_task, "subject_plural", cfg, warn=False) == (scoring, faith)


def test_enough_pairs_draw_as_before_without_warning():
    """Data with enough pairs: no warning, and the first pairs of a larger request are the
    pairs of a smaller one (the draws did not change)."""
    task = get_task("agreement_singular")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PairShortageWarning)
        small = pair_sets(task, "verb_plural", PatchingConfig(n_pairs=6, seed=4))
        large = pair_sets(task, "verb_plural", PatchingConfig(n_pairs=12, seed=4))
    assert (len(small[0]), len(small[1])) == (6, 6)
    assert large[0][:6] == small[0]


def test_vision_pairs_fewer_or_none(monkeypatch):
    """Image tasks: a pair the shape world cannot build ends the drawing when fewer are
    allowed (the experiment's patching allows them) and raises otherwise; with none built the
    patching batch is None, with the reason."""
    from subroutine_circuits.experiment.vision import image_pair_batch
    from subroutine_circuits.tasks.vision import vision_task
    from subroutine_circuits.tasks.vision.scenes import PlacementError

    task = vision_task("number_contact")
    world_cls = type(task.world(None))
    flip, calls = world_cls.flip, {"n": 0, "limit": 2}

    def flaky_flip(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise PlacementError("no room")
        return flip(self, *args, **kwargs)

    monkeypatch.setattr(world_cls, "flip", flaky_flip)
    pairs = task.make_minimal_pairs("contact", 5, seed=0, n_context=2, allow_fewer=True)
    assert len(pairs) == 2 and pairs.contexts.shape[:2] == (2, 2)
    assert pairs.clean_values.shape == (2, 2)
    calls["n"] = 0
    with pytest.raises(ValueError, match="cannot build a minimal pair"):
        task.make_minimal_pairs("contact", 5, seed=0)
    calls["n"], calls["limit"] = 0, 0
    batch, why = image_pair_batch(None, task, "contact", PatchingConfig(n_pairs=4), None)
    assert batch is None and "'contact'" in why


# ----------------------------------------------------------------------------- the experiment


def test_experiment_runs_on_thin_data(tmp_path):
    """Acceptance: a user's file with fewer minimal pairs than asked. The experiment
    completes; patching.csv records the pairs found and asked per subroutine (subject_plural:
    fewer pairs, patched; verb_plural: none, skipped); the warnings and report.html say so."""
    from subroutine_circuits.experiment import config_from_dict, run_experiment

    cfg = config_from_dict(
        {
            "task": str(agreement_file(tmp_path / "agree.jsonl")),
            "rule": RULE,
            "inits": ["trained"],
            "base_seeds": [0],
            "mask_seeds": [0],
            "min_composite_acc": 0.0,
            "patching": True,
            "patching_inits": ["trained"],
            "patching_methods": ["attribution"],
            "patching_pairs": 24,
            "data": {"n_train": 60, "n_val": 12, "n_test": 12, "corpus_size": 200},
            "train": {"max_steps": 30, "eval_every": 30},
            "mask": {"steps": 30, "lr": 0.1, "init": 1.0, "grid": [{"l0_weight": 4.0}]},
            "n_random": 20,
        }
    )
    torch.manual_seed(0)
    out = tmp_path / "out"
    with pytest.warns(PairShortageWarning) as record:
        run_experiment(cfg, out, progress=False)
    msgs = _shortages(record)
    assert any("'subject_plural'" in m and "patching runs with the pairs found" in m for m in msgs)
    assert any("'verb_plural'" in m and "patching of 'verb_plural' is skipped" in m for m in msgs)
    assert all("'test' split" in m and "of 24 scoring pairs" in m for m in msgs)

    patch = pd.read_csv(out / "patching.csv").set_index("subroutine")
    subj, verb = patch.loc["subject_plural"], patch.loc["verb_plural"]
    assert subj["status"] == "fewer pairs" and verb["status"] == "skipped"
    assert 0 < subj["n_pairs"] < 24 and 0 < subj["n_faith_pairs"] < 24
    assert (subj["n_pairs_asked"], subj["n_faith_pairs_asked"]) == (24, 24)
    assert subj["n_pairs"] + subj["n_faith_pairs"] < 48
    assert not math.isnan(subj["cpr"]) and isinstance(subj["scores_file"], str)
    assert (verb["n_pairs"], verb["n_faith_pairs"]) == (0, 0)
    assert math.isnan(verb["cpr"]) and "no pair_id group" in verb["pairs_note"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "patching skipped: too few minimal pairs in the data" in page
    assert "patching ran with fewer minimal pairs than asked" in page


def test_subword_tokenizer_pairs_found_are_shared(tmp_path, thin_task):
    """Subword tokenizers draw 4x the pairs to align at word boundaries: on thin data every
    aligned pair found is shared between scoring and faithfulness (unaligned ones counted),
    and a subroutine with none is skipped by run_patching (NaN measures, status and note)."""
    pytest.importorskip("transformers")
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment import hf
    from subroutine_circuits.experiment.patching import build_pair_data, run_patching
    from subroutine_circuits.models.hf_build import (
        save_gpt2_folder,
        task_texts,
        train_bpe_tokenizer,
    )

    folder = save_gpt2_folder(tmp_path / "gpt2", train_bpe_tokenizer(task_texts()))
    model, tok = hf.load_hf_model(folder)
    adapter = as_adapter(model, tokenizer=tok).freeze()
    cfg = PatchingConfig(n_pairs=6, kinds=("head",), methods=("attribution",), score_split="test")
    with pytest.warns(PairShortageWarning, match="'subject_plural' than asked in the 'test'"):
        scoring, faith = build_pair_data(adapter, tok, thin_task, "subject_plural", cfg)
    assert 0 < scoring.n_pairs < 6 and 0 < faith.n_pairs < 6
    assert (scoring.n_asked, faith.n_asked) == (6, 6)
    assert not set(scoring.texts) & set(faith.texts)
    with pytest.warns(PairShortageWarning, match="patching of 'verb_plural' is skipped"):
        (row,) = run_patching(adapter, tok, thin_task, "verb_plural", None, None, cfg)
    assert row["status"] == "skipped" and (row["n_pairs"], row["n_faith_pairs"]) == (0, 0)
    assert math.isnan(row["cpr"]) and "no pair_id group" in row["pairs_note"]
