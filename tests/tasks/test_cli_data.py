"""Round-trip tests of ``subroutine-circuits tasks`` and ``subroutine-circuits data``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from subroutine_circuits.cli import main
from subroutine_circuits.tasks import (
    OOOProblem,
    WordTokenizer,
    get_task,
    list_tasks,
    list_vision_tasks,
)
from subroutine_circuits.tasks import language as L
from subroutine_circuits.tasks.cli import cmd_data, parse_rule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _read(path: Path) -> list[OOOProblem]:
    return [OOOProblem.from_json(json.loads(line)) for line in path.read_text().splitlines()]


def _check_rules(p: OOOProblem, rule: dict[str, bool]) -> None:
    pos = [v for i, v in enumerate(p.values) if i != p.odd_index]
    odd = p.values[p.odd_index]
    if p.kind == "composite":
        assert all(all(v[k] == r for k, r in rule.items()) for v in pos)
        assert any(odd[k] != r for k, r in rule.items())
    elif p.kind.startswith("sub_"):
        k = p.kind[4:]
        assert all(v[k] == rule[k] for v in pos) and odd[k] != rule[k]
    else:
        k = p.kind[len("partition_") :]
        assert all(all(v[q] == r for q, r in rule.items()) for v in pos)
        assert odd[k] != rule[k]
        assert all(odd[q] == r for q, r in rule.items() if q != k)


def test_tasks_table_and_json(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in list_tasks():
        assert name in out
    assert "subject_plural=false, verb_plural=false" in out
    assert main(["tasks", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in infos] == list_tasks() + list_vision_tasks()
    assert infos[3]["rule"] == {"antecedent_plural": True, "reflexive_plural": True}


def test_data_builtin_roundtrip(tmp_path):
    out = tmp_path / "data"
    assert main(["data", "agreement_plural", "--out", str(out), "--n", "40", "--seed", "1"]) == 0
    task = get_task("agreement_plural")
    texts: dict[str, set[str]] = {}
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        files = sorted(f.name for f in (out / split).iterdir())
        assert files == sorted(f"{k}.jsonl" for k in task.problem_kinds())
        texts[split] = set()
        for kind in task.problem_kinds():
            probs = _read(out / split / f"{kind}.jsonl")
            assert len(probs) == n and all(p.kind == kind for p in probs)
            for p in probs:
                _check_rules(p, task.rule)
                # the stored values agree with the words (number of head noun and final verb)
                for t, v in zip(p.stimuli, p.values):
                    w = t.split()
                    head = w[2] if w[1] in L.ADJECTIVES else w[1]
                    assert v["subject_plural"] == (head in L.NOUNS.values())
                    assert v["verb_plural"] == (w[-1] in L.INTRANSITIVE_VERBS)
                texts[split].update(p.stimuli)
    assert not texts["train"] & texts["val"] and not texts["val"] & texts["test"]
    assert not texts["train"] & texts["test"]
    meta = json.loads((out / "task.json").read_text())
    assert meta["name"] == "agreement_plural" and meta["seed"] == 1
    assert meta["counts"]["val"]["composite"] == 10
    tok = WordTokenizer.load(out / "tokenizer.json")
    assert all(tok.unknown_words(t) == [] for ts in texts.values() for t in ts)
    # deterministic: the same command writes the same bytes
    out2 = tmp_path / "data2"
    assert main(["data", "agreement_plural", "--out", str(out2), "--n", "40", "--seed", "1"]) == 0
    for f in out.rglob("*.jsonl"):
        assert f.read_bytes() == (out2 / f.relative_to(out)).read_bytes()


def test_data_user_file_roundtrip(tmp_path):
    out = tmp_path / "u"
    src = EXAMPLES / "user_task.jsonl"
    rc = main(["data", str(src), "--out", str(out), "--n", "20", "--rule", "negated=false"])
    assert rc == 0
    rows = {json.loads(line)["text"]: json.loads(line) for line in src.read_text().splitlines()}
    rule = {"negated": False}
    kinds = ["composite", "sub_negated", "partition_negated"]
    for split in ("train", "val", "test"):
        assert sorted(f.name for f in (out / split).iterdir()) == sorted(
            f"{k}.jsonl" for k in kinds
        )
        for kind in kinds:
            for p in _read(out / split / f"{kind}.jsonl"):
                _check_rules(p, rule)
                for t, v in zip(p.stimuli, p.values):
                    assert {k: rows[t][k] for k in v} == v
    meta = json.loads((out / "task.json").read_text())
    assert meta["rule"] == rule and meta["predicates"] == ["subject_animal", "negated"]


def test_data_csv_default_rule(tmp_path):
    out = tmp_path / "c"
    assert main(["data", str(EXAMPLES / "user_task.csv"), "--out", str(out), "--n", "8"]) == 0
    for p in _read(out / "test" / "composite.jsonl"):
        _check_rules(p, {"subject_animal": True, "negated": True})


def test_data_bad_inputs(tmp_path, capsys):
    args = argparse.Namespace(task="agreement", rule=[], out=str(tmp_path), n=4, seed=0)
    with pytest.raises(ValueError, match="unknown task 'agreement'; known tasks: agreement_sing"):
        cmd_data(args)
    assert main(["data", "nope_task", "--out", str(tmp_path / "x")]) == 2
    assert "known tasks" in capsys.readouterr().err
    assert main(["data", "agreement_singular", "--out", str(tmp_path), "--rule", "verb"]) == 2
    assert "PRED=true" in capsys.readouterr().err
    rc = main(["data", "anaphora_singular", "--out", str(tmp_path), "--rule", "verb_plural=true"])
    assert rc == 2
    assert "unknown predicate 'verb_plural'" in capsys.readouterr().err
    assert parse_rule(["a=yes", "b=0"]) == {"a": True, "b": False}
    assert parse_rule([]) is None


def test_tasks_command_imports_no_torch():
    """``subroutine-circuits tasks`` stays fast: neither torch nor TransformerLens is imported."""
    import subprocess
    import sys

    code = (
        "import sys; from subroutine_circuits.cli import main; rc = main(['tasks']); "
        "assert rc == 0; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip().splitlines()[-1] == "False False"
