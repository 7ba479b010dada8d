"""Tests of the built-in task suite: grammar stimuli checked by an independent parser, minimal
pairs, odd-one-out problems of every kind, label examples, splits and the word tokenizer."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest

from subroutine_circuits.tasks import (
    SPECIAL_TOKENS,
    OOOProblem,
    Task,
    WordTokenizer,
    get_task,
    list_tasks,
    make_label_examples,
    make_problems,
    make_splits,
    split_of,
)
from subroutine_circuits.tasks import language as L

BUILTIN = ["agreement_singular", "agreement_plural", "anaphora_singular", "anaphora_plural"]

# ----- an independent checker -------------------------------------------------------------------
# Number of every word form, from the lexicon's word lists (the parsing logic below is separate
# from the generator: it reads the sentence left to right by its structure).
NOUN_PLURAL: dict[str, bool] = {}
for sg, pl in itertools.chain(
    L.NOUNS.items(), L.PEOPLE.items(), ((s, p) for s, (p, _g) in L.PERSONS.items())
):
    NOUN_PLURAL[sg] = False
    NOUN_PLURAL[pl] = True
GENDER = {s: g for s, (_p, g) in L.PERSONS.items()}
GENDER.update({p: g for _s, (p, g) in L.PERSONS.items()})
IV_PLURAL = {
    **{s: False for s in L.INTRANSITIVE_VERBS.values()},
    **dict.fromkeys(L.INTRANSITIVE_VERBS, True),
}
TV_PLURAL = {
    **{s: False for s in L.TRANSITIVE_VERBS.values()},
    **dict.fromkeys(L.TRANSITIVE_VERBS, True),
}
REFL = {"himself": (False, "m"), "herself": (False, "f"), "themselves": (True, None)}
DETS = set(L.DETERMINERS)


class ParseError(AssertionError):
    """The sentence does not fit the grammar the checker knows."""


def parse(text: str) -> dict:
    """Parse a sentence of the grammar; return head noun, its number and the main predicate.

    Raises ParseError if the sentence does not fit; checks that relative-clause verbs agree with
    their own subjects (the attractor clause is always grammatical).
    """
    w = text.split()
    if text != text.lower() or "  " in text:
        raise ParseError(f"not lower-case single-spaced: {text!r}")

    def np(i: int) -> tuple[int, str]:
        if i >= len(w) or w[i] not in DETS:
            raise ParseError(f"expected a determiner at {i} in {text!r}")
        i += 1
        if i < len(w) and w[i] in L.ADJECTIVES:
            i += 1
        if i >= len(w) or w[i] not in NOUN_PLURAL:
            raise ParseError(f"expected a noun at {i} in {text!r}")
        return i + 1, w[i]

    i, head = np(0)
    out = {"head": head, "head_plural": NOUN_PLURAL[head], "frame": "simple"}
    if w[i] in L.PREPOSITIONS:
        i, out["attractor"] = np(i + 1)
        out["frame"] = "pp"
    elif w[i] in ("that", "who"):
        if w[i + 1] in DETS:
            i, inner = np(i + 1)
            if w[i] not in TV_PLURAL or TV_PLURAL[w[i]] != NOUN_PLURAL[inner]:
                raise ParseError(f"relative-clause verb {w[i]!r} does not agree in {text!r}")
            out.update(frame="rc_obj", attractor=inner)
            i += 1
        elif w[i + 1] in L.PAST_VERBS:
            i, out["attractor"] = np(i + 2)
            out["frame"] = "rc_subj"
        else:
            raise ParseError(f"bad relative clause in {text!r}")
    v = w[i]
    if v in L.PAST_VERBS:
        if i + 1 >= len(w) or w[i + 1] not in REFL:
            raise ParseError(f"expected a reflexive after {v!r} in {text!r}")
        out["reflexive"] = w[i + 1]
        out["reflexive_plural"], out["reflexive_gender"] = REFL[w[i + 1]]
        i += 2
    elif v in IV_PLURAL:
        out["verb"], out["verb_plural"] = v, IV_PLURAL[v]
        i += 1
        if i < len(w) and w[i] == "and":
            if IV_PLURAL.get(w[i + 1]) != IV_PLURAL[v]:
                raise ParseError(f"conjoined verbs disagree in {text!r}")
            i += 2
    elif v in TV_PLURAL:
        out["verb"], out["verb_plural"] = v, TV_PLURAL[v]
        i, _obj = np(i + 1)
    else:
        raise ParseError(f"expected a main verb at {i} in {text!r}")
    if i < len(w) and w[i] in L.ADVERBS:
        i += 1
    if i != len(w):
        raise ParseError(f"trailing words in {text!r}")
    return out


def checked_values(task: Task, text: str) -> dict[str, bool]:
    """The predicate values of a task stimulus as read by the parser (task-specific slots)."""
    p = parse(text)
    if task.name.startswith("agreement"):
        assert p["verb"] == text.split()[-1] and p["verb"] in IV_PLURAL, text
        assert len(text.split()) <= 10
        return {"subject_plural": p["head_plural"], "verb_plural": p["verb_plural"]}
    assert p["head"] in GENDER, text
    assert p["reflexive"] == text.split()[-1], text
    if not p["reflexive_plural"]:  # singular reflexives follow the antecedent's gender
        assert p["reflexive_gender"] == GENDER[p["head"]], text
    assert len(text.split()) <= 10
    return {"antecedent_plural": p["head_plural"], "reflexive_plural": p["reflexive_plural"]}


def test_lexicon_forms_and_size():
    """Spot-check word forms by hand; forms of different categories never collide."""
    assert L.NOUNS["child"] == "children" and L.NOUNS["box"] == "boxes"
    assert L.NOUNS["city"] == "cities" and L.NOUNS["key"] == "keys"
    assert L.INTRANSITIVE_VERBS["cry"] == "cries" and L.TRANSITIVE_VERBS["push"] == "pushes"
    assert L.PERSONS["king"] == ("kings", "m") and L.PERSONS["queen"] == ("queens", "f")
    assert L.PERSONS["wife"] == ("wives", "f")
    assert len(L.NOUNS) >= 40 and len(L.INTRANSITIVE_VERBS) + len(L.TRANSITIVE_VERBS) >= 30
    assert len(L.PERSONS) >= 30
    groups = [set(NOUN_PLURAL), set(IV_PLURAL), set(TV_PLURAL), set(L.PAST_VERBS)]
    groups += [set(L.ADJECTIVES), set(L.PREPOSITIONS), set(L.ADVERBS), set(REFL), DETS]
    for a, b in itertools.combinations(groups, 2):
        assert not (a & b), a & b
    vocab = L.lexicon_words()
    assert len(vocab) == len(set(vocab)) and 200 <= len(vocab) <= 600


def test_list_tasks_and_unknown_name():
    assert list_tasks() == BUILTIN
    with pytest.raises(ValueError, match="known tasks: agreement_singular"):
        get_task("agreement")
    assert get_task("agreement_plural").rule == {"subject_plural": True, "verb_plural": True}
    assert get_task("anaphora_singular").predicates == ("antecedent_plural", "reflexive_plural")


@pytest.mark.parametrize("name", BUILTIN)
def test_samples_have_requested_values(name):
    """500 stimuli per predicate combination: the parser reads the requested values."""
    task = get_task(name)
    rng = random.Random(1)
    frames = Counter()
    texts = set()
    for a, b in itertools.product([False, True], repeat=2):
        want = dict(zip(task.predicates, (a, b)))
        for _ in range(500):
            s = task.sample(want, rng)
            assert s.values == want
            assert checked_values(task, s.text) == want
            frames[parse(s.text)["frame"]] += 1
            texts.add(s.text)
    # every frame is used and stimuli rarely repeat
    expected = {"simple", "pp", "rc_obj", "rc_subj"} if name.startswith("agree") else None
    if expected:
        assert set(frames) == expected
    else:
        assert set(frames) == {"simple", "pp", "rc_obj"}  # "who" clause parses as rc_obj
    assert min(frames.values()) > 300
    assert len(texts) > 0.9 * 2000


@pytest.mark.parametrize("name", BUILTIN)
def test_minimal_pairs_flip_one_word(name):
    task = get_task(name)
    rng = random.Random(2)
    for flip in task.predicates:
        for a, b in itertools.product([False, True], repeat=2):
            want = dict(zip(task.predicates, (a, b)))
            for _ in range(60):
                s1, s2 = task.minimal_pair(want, flip, rng)
                v1, v2 = checked_values(task, s1.text), checked_values(task, s2.text)
                assert v1 == want == s1.values
                assert v2 == {**want, flip: not want[flip]} == s2.values
                w1, w2 = s1.text.split(), s2.text.split()
                assert len(w1) == len(w2)
                diff = [i for i in range(len(w1)) if w1[i] != w2[i]]
                assert len(diff) == 1
    with pytest.raises(ValueError, match="unknown predicate 'plural'"):
        task.minimal_pair({}, "plural", rng)


@pytest.mark.parametrize("name", ["agreement_singular", "anaphora_plural"])
def test_corpus_is_grammatical_and_varied(name):
    task = get_task(name)
    corpus = task.corpus(1500, random.Random(3))
    frames = Counter()
    for text in corpus:
        p = parse(text)
        if "verb_plural" in p:
            assert p["verb_plural"] == p["head_plural"], text
        else:
            assert p["reflexive_plural"] == p["head_plural"], text
            if not p["reflexive_plural"]:
                assert p["reflexive_gender"] == GENDER[p["head"]], text
        frames[("refl" if "reflexive" in p else "verb", p["frame"])] += 1
        assert len(text.split()) <= 14
    assert len(frames) >= 7
    assert len(set(corpus)) > 1400
    # more varied than the stimuli: some sentences have adverbs, objects or other determiners
    assert any(t.split()[-1] in L.ADVERBS for t in corpus)
    assert any(t.split()[0] != "the" for t in corpus)


@pytest.mark.parametrize("name", BUILTIN)
def test_tokenizer_covers_task(name):
    task = get_task(name)
    tok = task.tokenizer()
    rng = random.Random(4)
    texts = [task.sample({}, rng).text for _ in range(300)] + task.corpus(300, rng)
    for t in texts:
        assert tok.unknown_words(t) == []
        ids = tok.encode(t)
        assert ids[0] == tok.bos_id and tok.unk_id not in ids
        assert tok.decode(ids) == t


def test_word_tokenizer_api(tmp_path):
    tok = WordTokenizer.from_texts(["the dog runs", "the cats run fast"])
    assert tok.itos[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.bos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 6
    sep = tok.stoi["[SEP]"]
    assert tok.encode("the dog flies") == [1, tok.stoi["the"], tok.stoi["dog"], tok.unk_id, sep]
    assert tok.encode("the dog", add_eos=False) == [1, tok.stoi["the"], tok.stoi["dog"]]
    tokens, lengths = tok.encode_batch(["the dog runs", "fast"])
    assert tokens.shape == (2, 5) and tokens.dtype.is_floating_point is False
    assert lengths.tolist() == [5, 3]
    assert tokens[1].tolist() == [1, tok.stoi["fast"], sep, 0, 0]
    tok.save(tmp_path / "tok.json")
    assert WordTokenizer.load(tmp_path / "tok.json") == tok
    assert WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))).itos == tok.itos
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer.from_dict({"vocab": ["a", "b"]})
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(["the dog runs"], max_len=2)


# ----- odd-one-out problems ----------------------------------------------------------------------
def _check_problem(task: Task, prob: OOOProblem, rule: dict[str, bool]) -> tuple:
    """Assert the rules of the problem's kind from the parsed values; return the odd values."""
    vals = [checked_values(task, t) for t in prob.stimuli]
    assert vals == prob.values
    assert len(set(prob.stimuli)) == 4
    odd = vals[prob.odd_index]
    pos = [v for i, v in enumerate(vals) if i != prob.odd_index]
    A, B = task.predicates
    if prob.kind == "composite":
        assert all(v == rule for v in pos)
        assert odd != rule
    elif prob.kind.startswith("sub_"):
        p = prob.kind[4:]
        assert all(v[p] == rule[p] for v in pos) and odd[p] != rule[p]
    else:
        p = prob.kind[len("partition_") :]
        q = B if p == A else A
        assert all(v == rule for v in pos)
        assert odd[p] != rule[p] and odd[q] == rule[q]
    return tuple(odd[p] != rule[p] for p in task.predicates)


@pytest.mark.parametrize("name", BUILTIN)
def test_ooo_kinds_obey_rules(name):
    task = get_task(name)
    rule = dict(task.rule)
    kinds = task.problem_kinds()
    A, B = task.predicates
    assert kinds == ["composite", f"sub_{A}", f"sub_{B}", f"partition_{A}", f"partition_{B}"]
    rng = random.Random(5)
    for kind in kinds:
        probs = make_problems(task, kind, 150, rng)
        broken = Counter(_check_problem(task, p, rule) for p in probs)
        if kind == "composite":  # A, B or both, equally often
            assert set(broken) == {(True, False), (False, True), (True, True)}
            assert max(broken.values()) - min(broken.values()) <= 1
        if kind.startswith("sub_"):  # the other predicate is random in positives and odd
            other = B if kind == f"sub_{A}" else A
            pos_other = Counter(
                v[other] for p in probs for i, v in enumerate(p.values) if i != p.odd_index
            )
            odd_other = Counter(p.values[p.odd_index][other] for p in probs)
            assert 0.4 < pos_other[True] / 450 < 0.6
            assert 0.3 < odd_other[True] / 150 < 0.7


def test_odd_position_uniform():
    task = get_task("agreement_singular")
    probs = make_problems(task, "composite", 4000, random.Random(6))
    counts = Counter(p.odd_index for p in probs)
    assert all(abs(counts[i] - 1000) <= 50 for i in range(4)), counts


@pytest.mark.parametrize("name", BUILTIN)
def test_no_word_overlap_shortcut(name):
    """The stimulus sharing fewest words with the others is the odd one only at chance level.

    For anaphora the reflexive word itself carries ``reflexive_plural`` (the rule), so it is left
    out of the overlap; every other word must carry no signal.
    """
    task = get_task(name)
    probs = make_problems(task, "composite", 1000, random.Random(7))
    hits = 0
    for p in probs:
        sets = [set(t.split()) - set(REFL) for t in p.stimuli]
        overlap = [sum(len(sets[i] & sets[j]) for j in range(4) if j != i) for i in range(4)]
        hits += overlap.index(min(overlap)) == p.odd_index
    assert hits / 1000 < 0.32
    # positives vary: the three positives rarely share their head noun
    same_head = sum(
        len({parse(t)["head"] for i, t in enumerate(p.stimuli) if i != p.odd_index}) < 3
        for p in probs
    )
    assert same_head < 150


def test_make_splits_disjoint_and_deterministic():
    task = get_task("anaphora_singular")
    splits = make_splits(task, 80, seed=3)
    assert list(splits) == ["train", "val", "test"]
    assert {k: len(v) for k, v in splits["val"].items()} == dict.fromkeys(task.problem_kinds(), 20)
    texts = {
        s: {t for probs in d.values() for p in probs for t in p.stimuli} for s, d in splits.items()
    }
    assert not texts["train"] & texts["val"]
    assert not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]
    for s, ts in texts.items():  # every text is in the split its hash says
        assert all(split_of(t, 3) == s for t in ts)
    again = make_splits(task, 80, seed=3)
    assert [p.to_json() for p in again["test"]["composite"]] == [
        p.to_json() for p in splits["test"]["composite"]
    ]
    other = make_splits(task, 80, seed=4)
    assert other["train"]["composite"][0].stimuli != splits["train"]["composite"][0].stimuli
    # absolute counts and a subset of kinds
    sub = make_splits(task, {"composite": 10}, seed=3, split_sizes=(10, 4, 2))
    assert [len(sub[s]["composite"]) for s in ("train", "val", "test")] == [10, 4, 2]
    assert list(sub["train"]) == ["composite"]
    with pytest.raises(ValueError, match="unknown problem kind 'sub_x'"):
        make_splits(task, {"sub_x": 3}, seed=0)


def test_split_of_fractions():
    counts = Counter(split_of(f"text {i}", 0) for i in range(5000))
    assert abs(counts["train"] / 5000 - 0.6) < 0.03
    assert abs(counts["val"] / 5000 - 0.2) < 0.03
    assert split_of("the dog runs", 0) == split_of("the dog runs", 0)


def test_rule_override_and_bad_rule():
    task = get_task("agreement_singular", rule={"subject_plural": True, "verb_plural": False})
    probs = make_problems(task, "partition_verb_plural", 50, random.Random(0))
    for p in probs:
        _check_problem(task, p, task.rule)
    only_a = get_task("agreement_singular", rule={"subject_plural": False})
    assert only_a.problem_kinds() == ["composite", "sub_subject_plural", "partition_subject_plural"]
    with pytest.raises(ValueError, match="unknown predicate 'plural'.*known predicates"):
        get_task("agreement_singular", rule={"plural": True})


def test_ooo_problem_json_roundtrip():
    task = get_task("anaphora_plural")
    for p in make_problems(task, "sub_reflexive_plural", 20, random.Random(1)):
        d = json.loads(json.dumps(p.to_json()))
        assert OOOProblem.from_json(d) == p
    with pytest.raises(ValueError, match="odd_index"):
        OOOProblem(["a", "b", "c", "d"], 4, "composite", [{}] * 4)
    with pytest.raises(ValueError, match="lacks the key 'kind'"):
        OOOProblem.from_json({"stimuli": ["a"] * 4, "odd_index": 0, "values": [{}] * 4})


@pytest.mark.parametrize("kind", ["composite", "sub_subject_plural", "partition_verb_plural"])
def test_label_examples(kind):
    task = get_task("agreement_plural")
    ex = make_label_examples(task, 301, seed=0, kind=kind, split="val")
    assert Counter(e.label for e in ex) == {True: 151, False: 150}
    rule = task.rule
    for e in ex:
        vals = checked_values(task, e.text)
        assert vals == e.values and split_of(e.text, 0) == "val"
        if kind == "composite":
            assert e.label == (vals == rule)
        elif kind == "sub_subject_plural":
            assert e.label == (vals["subject_plural"] == rule["subject_plural"])
        else:
            assert vals["subject_plural"] == rule["subject_plural"]
            assert e.label == (vals["verb_plural"] == rule["verb_plural"])
        assert e.label_word == ("yes" if e.label else "no")


def test_grammar_config_frames():
    task = get_task("agreement_singular", cfg=L.GrammarConfig(frames={"pp": 1.0}, p_adjective=0.0))
    rng = random.Random(8)
    for _ in range(100):
        s = task.sample({}, rng)
        assert parse(s.text)["frame"] == "pp" and len(s.text.split()) == 6
    with pytest.raises(ValueError, match="unknown sentence frame 'rc'.*simple, pp"):
        get_task("agreement_plural", cfg=L.GrammarConfig(frames={"rc": 1.0}))
    with pytest.raises(ValueError, match="p_adjective"):
        L.GrammarConfig(p_adjective=1.5)
