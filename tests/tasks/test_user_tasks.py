"""Tests of users' own tasks from JSONL/CSV files: loading, sampling, minimal pairs, OOO
problems, splits, and a clear error for every kind of bad input."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from subroutine_circuits.tasks import (
    load_task,
    load_user_task,
    make_label_examples,
    make_problems,
    make_splits,
    split_of,
)
from subroutine_circuits.tasks.user import parse_bool

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _truth(text: str) -> dict[str, bool]:
    """Independent reading of the example task: animal subject? negated ("cannot")?"""
    words = text.split()
    animals = "cat dog horse bird fox goat mouse rabbit wolf bear duck sheep".split()
    return {"subject_animal": words[1] in animals, "negated": words[2] == "cannot"}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_example_files_load_identically():
    a = load_user_task(EXAMPLES / "user_task.jsonl")
    b = load_user_task(EXAMPLES / "user_task.csv")
    assert a.predicates == b.predicates == ("subject_animal", "negated")
    assert a.rule == {"subject_animal": True, "negated": True}  # default: all True
    assert [(s.text, s.values) for s in a.stimuli] == [(s.text, s.values) for s in b.stimuli]
    assert len(a.stimuli) == 240
    assert set(a.counts().values()) == {60}
    for s in a.stimuli:
        assert s.values == _truth(s.text)
    tok = a.tokenizer()
    assert all(tok.unknown_words(s.text) == [] for s in a.stimuli)
    assert load_task(str(EXAMPLES / "user_task.csv")).predicates == a.predicates


def test_sample_and_minimal_pairs_by_pair_id():
    task = load_user_task(EXAMPLES / "user_task.jsonl")
    texts = {s.text for s in task.stimuli}
    rng = random.Random(0)
    for _ in range(200):
        want = {"subject_animal": rng.random() < 0.5, "negated": rng.random() < 0.5}
        s = task.sample(want, rng)
        assert s.text in texts and _truth(s.text) == want
        flip = rng.choice(task.predicates)
        s1, s2 = task.minimal_pair(want, flip, rng)
        assert _truth(s1.text) == want
        assert _truth(s2.text) == {**want, flip: not want[flip]}
        assert task.pair_ids[s1.text] == task.pair_ids[s2.text]
        w1, w2 = s1.text.split(), s2.text.split()
        assert sum(x != y for x, y in zip(w1, w2)) == 1 and len(w1) == len(w2)


def test_minimal_pairs_without_pair_id(tmp_path):
    rows = [
        {"text": "the cat can run", "a": True, "b": False},
        {"text": "the cat cannot run", "a": True, "b": True},
        {"text": "the car can run", "a": False, "b": False},
        {"text": "a car cannot stop now", "a": False, "b": True},
    ]
    task = load_user_task(_write_jsonl(tmp_path / "t.jsonl", rows))
    s1, s2 = task.minimal_pair({"a": True, "b": False}, "b", random.Random(0))
    assert (s1.text, s2.text) == ("the cat can run", "the cat cannot run")
    s1, s2 = task.minimal_pair({"a": True, "b": False}, "a", random.Random(0))
    assert (s1.text, s2.text) == ("the cat can run", "the car can run")
    with pytest.raises(ValueError, match="no minimal pair for 'a'.*pair_id"):
        task.minimal_pair({"a": False, "b": True}, "a", random.Random(0))


def test_user_ooo_problems_obey_rules_and_splits():
    task = load_user_task(EXAMPLES / "user_task.jsonl", rule={"negated": False})
    assert task.problem_kinds() == ["composite", "sub_negated", "partition_negated"]
    splits = make_splits(task, 60, seed=2)
    seen: dict[str, set[str]] = {}
    for split, kinds in splits.items():
        seen[split] = set()
        for probs in kinds.values():
            assert len(probs) == (60 if split == "train" else 15)
            for p in probs:
                vals = [_truth(t) for t in p.stimuli]
                assert vals == p.values and len(set(p.stimuli)) == 4
                pos = [v for i, v in enumerate(vals) if i != p.odd_index]
                assert all(not v["negated"] for v in pos)
                assert vals[p.odd_index]["negated"]
                seen[split].update(p.stimuli)
        # the non-rule predicate is random among positives
        animals = Counter(
            v["subject_animal"]
            for p in kinds["composite"]
            for i, v in enumerate(p.values)
            if i != p.odd_index
        )
        assert animals[True] > 0 and animals[False] > 0
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]
    ex = make_label_examples(task, 40, seed=2, split="test")
    assert all(split_of(e.text, 2) == "test" for e in ex)
    assert all(e.label == (not _truth(e.text)["negated"]) for e in ex)


def test_parse_bool_variants():
    for v in (True, 1, "1", "true", "True", " yes ", "YES"):
        assert parse_bool(v, "x") is True
    for v in (False, 0, "0", "false", "FALSE", "no"):
        assert parse_bool(v, "x") is False
    for v in ("maybe", 2, None, "", 0.5):
        with pytest.raises(ValueError, match="x: non-boolean value"):
            parse_bool(v, "x")


# ----- bad input ---------------------------------------------------------------------------------
def test_missing_text_column(tmp_path):
    p = _write_csv(tmp_path / "t.csv", ["sentence", "a"], [["the cat", "1"]])
    with pytest.raises(ValueError, match="missing column 'text'"):
        load_user_task(p)


def test_missing_predicate_column(tmp_path):
    p = _write_csv(tmp_path / "t.csv", ["text", "a"], [["the cat", "1"]])
    with pytest.raises(ValueError, match="missing column 'b'"):
        load_user_task(p, predicates=["a", "b"])
    q = _write_jsonl(tmp_path / "t.jsonl", [{"text": "x y", "a": 1}, {"text": "y z"}])
    with pytest.raises(ValueError, match=r"t.jsonl:2: missing column 'a'"):
        load_user_task(q)


def test_unknown_rule_predicate(tmp_path):
    with pytest.raises(ValueError, match="unknown predicate 'animal'.*subject_animal, negated"):
        load_user_task(EXAMPLES / "user_task.csv", rule={"animal": True})


def test_non_boolean_value_line_number(tmp_path):
    p = _write_csv(
        tmp_path / "t.csv", ["text", "a"], [["the cat", "yes"], ["the dog", "no"], ["x", "maybe"]]
    )
    with pytest.raises(ValueError, match=r"t.csv:4: column 'a': non-boolean value 'maybe'"):
        load_user_task(p)
    q = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a b", "a": True}, {"text": "c", "a": 3}])
    with pytest.raises(ValueError, match=r"t.jsonl:2: column 'a': non-boolean value 3"):
        load_user_task(q)


def test_too_few_stimuli_of_a_combination(tmp_path):
    rows = [{"text": f"pos {i}", "a": True, "b": True} for i in range(20)]
    rows += [{"text": f"onlya {i}", "a": False, "b": True} for i in range(20)]
    rows += [{"text": f"onlyb {i}", "a": True, "b": False} for i in range(20)]
    task = load_user_task(_write_jsonl(tmp_path / "t.jsonl", rows))
    # the composite odd one may break both predicates: that combination is absent
    with pytest.raises(
        ValueError,
        match=r"a=False, b=False.*to build 5 'composite' problems: need at least 1 distinct, "
        r"found 0",
    ):
        make_problems(task, "composite", 5, random.Random(0))
    # partitions need only present combinations
    probs = make_problems(task, "partition_a", 5, random.Random(0))
    assert all(p.values[p.odd_index] == {"a": False, "b": True} for p in probs)
    # positives need 3 distinct texts per combination
    few = rows[:2] + rows[20:]
    task2 = load_user_task(_write_jsonl(tmp_path / "t2.jsonl", few))
    with pytest.raises(ValueError, match=r"a=True, b=True.*need at least 3 distinct, found 2"):
        make_problems(task2, "partition_b", 3, random.Random(0))
    # per split: the message names the split
    with pytest.raises(ValueError, match=r"in split '(train|val|test)'"):
        make_splits(task2, {"partition_b": 3}, seed=0)


def test_other_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_user_task(tmp_path / "nope.jsonl")
    txt = tmp_path / "t.txt"
    txt.write_text("text,a\n")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_user_task(txt)
    empty = _write_csv(tmp_path / "e.csv", ["text", "a"], [])
    with pytest.raises(ValueError, match="holds no rows"):
        load_user_task(empty)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a", "a": true}\n{oops\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: invalid JSON"):
        load_user_task(bad)
    dup = _write_jsonl(
        tmp_path / "d.jsonl", [{"text": "a b", "a": True}, {"text": "a  b", "a": False}]
    )
    with pytest.raises(ValueError, match=r"d.jsonl:2: text 'a b' repeats line 1 with other"):
        load_user_task(dup)
    nopred = _write_csv(tmp_path / "n.csv", ["text", "pair_id"], [["a", "1"]])
    with pytest.raises(ValueError, match="no predicate columns"):
        load_user_task(nopred)
