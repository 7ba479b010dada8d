"""Built-in language tasks from a small English grammar (no external data).

Subject-verb agreement (predicates ``subject_plural``, ``verb_plural``)::

    the [adj] NOUN VERB                                   simple
    the [adj] NOUN PREP the [adj] NOUN2 VERB              prepositional-phrase attractor
    the [adj] NOUN that the [adj] NOUN2 TVERB VERB        object relative clause (TVERB agrees
                                                          with NOUN2, an attractor)
    the [adj] NOUN that TVERB_PAST the [adj] NOUN2 VERB   subject relative clause

``NOUN`` carries ``subject_plural``, the sentence-final intransitive ``VERB`` carries
``verb_plural``; the attractor ``NOUN2`` has a random number.

Reflexive anaphora (predicates ``antecedent_plural``, ``reflexive_plural``)::

    the [adj] PERSON TVERB_PAST REFL                              no intervening clause
    the [adj] PERSON who the [adj] PEOPLE2 TVERB TVERB_PAST REFL   intervening relative clause
    the [adj] PERSON PREP the [adj] PEOPLE2 TVERB_PAST REFL        intervening phrase

``PERSON`` (a gendered noun) carries ``antecedent_plural``, the final reflexive
(``himself``/``herself`` by the antecedent's gender, or ``themselves``) carries
``reflexive_plural``. Main verbs of anaphora sentences are past tense, so they carry no number.

Stimuli that break a predicate of the grammatical pattern are ungrammatical by design
("the dogs runs"). ``corpus`` returns only grammatical sentences from more frames (adverbs,
objects, other determiners) for self-supervised pretraining. All texts are lower-case words
separated by single spaces, at most 10 words for task stimuli.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from subroutine_circuits.tasks.base import Stimulus, Task

# ----- lexicon ---------
_IRREGULAR_PLURALS = {
    "child": "children",
    "man": "men",
    "woman": "women",
    "mouse": "mice",
    "knife": "knives",
    "wolf": "wolves",
    "leaf": "leaves",
    "wife": "wives",
    "gentleman": "gentlemen",
}


def _plural(noun: str) -> str:
    """English plural of a noun of this lexicon."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _third_singular(verb: str) -> str:
    """Third-person singular present of a verb of this lexicon."""
    if verb.endswith(("s", "x", "ch", "sh")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


#: Nouns of the agreement task (subjects and attractors): singular -> plural.
NOUNS: dict[str, str] = {
    n: _plural(n)
    for n in (
        "key cabinet dog cat bird horse teacher student doctor farmer lawyer pilot author "
        "singer painter driver child man woman mouse book table chair car truck window door "
        "house tree flower lamp clock bottle box bus church knife leaf wolf baby city fox "
        "bridge boat river road garden picture letter cup coat ship"
    ).split()
}
#: Intransitive verbs (sentence-final main verbs of agreement stimuli): plural -> 3sg.
INTRANSITIVE_VERBS: dict[str, str] = {
    v: _third_singular(v)
    for v in (
        "run sleep fall wait smile laugh move shake break shine swim stop work sit stand jump "
        "rest arrive glow roll spin sing dance cry fly hide appear vanish sink float grow burn "
        "shiver"
    ).split()
}
#: Transitive verbs (relative clauses): plural -> 3sg.
TRANSITIVE_VERBS: dict[str, str] = {
    v: _third_singular(v)
    for v in (
        "chase see like follow help love hate push find know meet call visit admire blame "
        "praise fear trust greet avoid thank remember ignore carry touch"
    ).split()
}
#: Past-tense transitive verbs (carry no number).
PAST_VERBS: tuple[str, ...] = tuple(
    (
        "chased saw liked followed helped loved hated pushed found knew met called visited "
        "admired blamed praised feared trusted greeted avoided thanked remembered ignored "
        "carried touched hurt washed defended taught"
    ).split()
)
#: Gendered people (anaphora antecedents): singular -> (plural, gender "m"/"f").
PERSONS: dict[str, tuple[str, str]] = {}
_PERSON_WORDS = (
    "king queen boy girl man woman actor actress waiter waitress prince princess uncle aunt "
    "father mother son daughter brother sister husband wife monk nun gentleman lady "
    "grandfather grandmother nephew niece wizard witch duke duchess groom bride emperor "
    "empress host hostess"
).split()
for _i, _w in enumerate(_PERSON_WORDS):
    PERSONS[_w] = (_plural(_w), "m" if _i % 2 == 0 else "f")
#: Ungendered people (inside intervening clauses of anaphora): singular -> plural.
PEOPLE: dict[str, str] = {
    n: _plural(n)
    for n in (
        "guard doctor teacher student farmer lawyer pilot singer painter driver author "
        "soldier nurse judge officer child neighbor"
    ).split()
}
ADJECTIVES: tuple[str, ...] = tuple(
    (
        "old young small big red blue green tall short happy quiet loud new strange famous "
        "tired clever brave lazy busy"
    ).split()
)
PREPOSITIONS: tuple[str, ...] = tuple(
    "near behind beside under above with to from by across".split()
)
ADVERBS: tuple[str, ...] = tuple(
    "quickly slowly often rarely again today now here there loudly quietly always".split()
)
DETERMINERS: tuple[str, ...] = ("the", "my", "our", "your", "his", "her", "their")
REFLEXIVES: dict[str, str] = {"m": "himself", "f": "herself"}
PLURAL_REFLEXIVE = "themselves"
FUNCTION_WORDS: tuple[str, ...] = ("that", "who", "and")
_NOUN_LIST = list(NOUNS)
_IV_LIST = list(INTRANSITIVE_VERBS)
_TV_LIST = list(TRANSITIVE_VERBS)
_PERSON_LIST = list(PERSONS)
_PEOPLE_LIST = list(PEOPLE)


def lexicon_words() -> list[str]:
    """Every word of the grammar, in a fixed order (the built-in tokenizer's vocabulary)."""
    words: list[str] = []
    words += list(DETERMINERS) + list(FUNCTION_WORDS)
    for sg, pl in NOUNS.items():
        words += [sg, pl]
    for pl, sg in INTRANSITIVE_VERBS.items():
        words += [sg, pl]
    for pl, sg in TRANSITIVE_VERBS.items():
        words += [sg, pl]
    words += list(PAST_VERBS)
    for sg, (pl, _g) in PERSONS.items():
        words += [sg, pl]
    for sg, pl in PEOPLE.items():
        words += [sg, pl]
    words += list(ADJECTIVES) + list(PREPOSITIONS) + list(ADVERBS)
    words += list(REFLEXIVES.values()) + [PLURAL_REFLEXIVE]
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


# ----- configuration ---------
@dataclass
class GrammarConfig:
    """Sampling knobs of the built-in grammar tasks.

    ``frames``: weights of the sentence frames of the task stimuli (agreement: ``simple``,
    ``pp``, ``rc_obj``, ``rc_subj``; anaphora: ``simple``, ``rc``, ``pp``; a frame missing from
    the dict is never used). ``p_adjective``: chance of an adjective before each noun.
    """

    frames: Mapping[str, float] | None = None
    p_adjective: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_adjective <= 1.0:
            raise ValueError(f"p_adjective must be in [0, 1], got {self.p_adjective}")


AGREEMENT_FRAMES: dict[str, float] = {"simple": 1.0, "pp": 1.0, "rc_obj": 1.0, "rc_subj": 1.0}
ANAPHORA_FRAMES: dict[str, float] = {"simple": 1.0, "rc": 1.0, "pp": 1.0}


def _choose_frame(frames: Mapping[str, float], known: Sequence[str], rng: random.Random) -> str:
    """Draw a frame name by weight (validated against ``known``)."""
    names = list(frames)
    for f in names:
        if f not in known:
            raise ValueError(f"unknown sentence frame {f!r}; known frames: {', '.join(known)}")
    weights = [float(frames[f]) for f in names]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"frame weights must be non-negative with a positive sum, got {frames}")
    return rng.choices(names, weights=weights)[0]


# ----- the grammar tasks ---------
class _GrammarTask(Task):
    """Shared machinery: a sentence skeleton with one word slot per predicate."""

    frame_names: tuple[str, ...] = ()
    default_frames: dict[str, float] = {}

    def __init__(
        self, name: str, rule: Mapping[str, bool], description: str, cfg: GrammarConfig | None
    ) -> None:
        self.name = name
        self.cfg = cfg or GrammarConfig()
        self.frames = dict(self.cfg.frames or self.default_frames)
        for f in self.frames:
            if f not in self.frame_names:
                raise ValueError(
                    f"unknown sentence frame {f!r} for {name}; known: {', '.join(self.frame_names)}"
                )
        self.description = description
        self.rule = self.check_values(dict(rule), what="rule")

    def _np(self, noun: str, rng: random.Random, det: str = "the") -> list[str]:
        """A noun phrase ``det [adj] noun``."""
        words = [det]
        if rng.random() < self.cfg.p_adjective:
            words.append(rng.choice(ADJECTIVES))
        return words + [noun]

    def _build(
        self, values: Mapping[str, bool], rng: random.Random
    ) -> tuple[list[str], dict[str, tuple[int, str, str]]]:
        """Words of a sentence and, per predicate, (index, form if False, form if True)."""
        raise NotImplementedError

    def _render(self, words: list[str], slots, values: Mapping[str, bool]) -> Stimulus:
        words = list(words)
        for p, (i, neg, pos) in slots.items():
            words[i] = pos if values[p] else neg
        return Stimulus(" ".join(words), {p: bool(values[p]) for p in self.predicates})

    def sample(self, values: Mapping[str, bool], rng: random.Random) -> Stimulus:
        """A sentence whose predicates take ``values`` (missing ones random)."""
        full = self.full_values(values, rng)
        words, slots = self._build(full, rng)
        return self._render(words, slots, full)

    def minimal_pair(
        self, values: Mapping[str, bool], flip: str, rng: random.Random
    ) -> tuple[Stimulus, Stimulus]:
        """The same sentence twice; only the word that carries ``flip`` changes its number."""
        if flip not in self.predicates:
            raise ValueError(
                f"unknown predicate {flip!r} to flip; "
                f"known predicates: {', '.join(self.predicates)}"
            )
        full = self.full_values(values, rng)
        words, slots = self._build(full, rng)
        flipped = dict(full)
        flipped[flip] = not full[flip]
        return self._render(words, slots, full), self._render(words, slots, flipped)

    def vocabulary(self) -> list[str]:
        """The whole grammar lexicon (shared by all built-in language tasks)."""
        return lexicon_words()

    def corpus(self, n: int, rng: random.Random) -> list[str]:
        """``n`` grammatical sentences from all frames of both built-in phenomena."""
        if n < 0:
            raise ValueError(f"corpus size must be >= 0, got {n}")
        return [_corpus_sentence(rng, self.cfg.p_adjective) for _ in range(n)]


class AgreementTask(_GrammarTask):
    """Subject-verb agreement with prepositional-phrase and relative-clause attractors."""

    predicates = ("subject_plural", "verb_plural")
    frame_names = ("simple", "pp", "rc_obj", "rc_subj")
    default_frames = AGREEMENT_FRAMES

    def _build(self, values, rng):
        frame = _choose_frame(self.frames, self.frame_names, rng)
        subj = rng.choice(_NOUN_LIST)
        verb = rng.choice(_IV_LIST)
        words = self._np(subj, rng)
        i_subj = len(words) - 1
        if frame != "simple":
            attractor = rng.choice([n for n in NOUNS if n != subj])
            att_pl = rng.random() < 0.5
            att = NOUNS[attractor] if att_pl else attractor
            if frame == "pp":
                words += [rng.choice(PREPOSITIONS)] + self._np(att, rng)
            elif frame == "rc_obj":
                tv = rng.choice(_TV_LIST)
                words += ["that"] + self._np(att, rng) + [tv if att_pl else TRANSITIVE_VERBS[tv]]
            else:  # rc_subj
                words += ["that", rng.choice(PAST_VERBS)] + self._np(att, rng)
        words.append(verb)
        slots = {
            "subject_plural": (i_subj, subj, NOUNS[subj]),
            "verb_plural": (len(words) - 1, INTRANSITIVE_VERBS[verb], verb),
        }
        return words, slots

    def prompt_pairs(self, n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
        """``n`` next-token prompt pairs for subject-verb agreement: the sentence up to its verb
        (clean), the same words with the subject's number flipped (corrupted), the verb form
        that agrees with the clean subject (answer) and the other form (wrong)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            plural = rng.random() < 0.5
            values = {"subject_plural": plural, "verb_plural": plural}
            words, slots = self._build(values, rng)
            i_subj, subj_sg, subj_pl = slots["subject_plural"]
            i_verb, verb_sg, verb_pl = slots["verb_plural"]
            prefix = list(words[:i_verb])
            prefix[i_subj] = subj_pl if plural else subj_sg
            flipped = list(prefix)
            flipped[i_subj] = subj_sg if plural else subj_pl
            answer, wrong = (verb_pl, verb_sg) if plural else (verb_sg, verb_pl)
            out.append((" ".join(prefix), " ".join(flipped), answer, wrong))
        return out


class AnaphoraTask(_GrammarTask):
    """Reflexive anaphora, with and without an intervening clause or phrase."""

    predicates = ("antecedent_plural", "reflexive_plural")
    frame_names = ("simple", "rc", "pp")
    default_frames = ANAPHORA_FRAMES

    def _build(self, values, rng):
        frame = _choose_frame(self.frames, self.frame_names, rng)
        ante = rng.choice(_PERSON_LIST)
        plural, gender = PERSONS[ante]
        words = self._np(ante, rng)
        i_ante = len(words) - 1
        if frame != "simple":
            other = rng.choice(_PEOPLE_LIST)
            other_pl = rng.random() < 0.5
            other_w = PEOPLE[other] if other_pl else other
            if frame == "rc":
                tv = rng.choice(_TV_LIST)
                words += ["who"] + self._np(other_w, rng)
                words.append(tv if other_pl else TRANSITIVE_VERBS[tv])
            else:  # pp
                words += [rng.choice(PREPOSITIONS)] + self._np(other_w, rng)
        words.append(rng.choice(PAST_VERBS))
        words.append(REFLEXIVES[gender])
        slots = {
            "antecedent_plural": (i_ante, ante, plural),
            "reflexive_plural": (len(words) - 1, REFLEXIVES[gender], PLURAL_REFLEXIVE),
        }
        return words, slots


# ----- pretraining corpus ---------
def _corpus_np(rng: random.Random, p_adj: float, people: bool = False) -> tuple[list[str], bool]:
    """A grammatical noun phrase with a random determiner; returns (words, is_plural)."""
    pl = rng.random() < 0.5
    if people:
        sg = rng.choice(list(PEOPLE) + list(PERSONS))
        noun = (PEOPLE[sg] if sg in PEOPLE else PERSONS[sg][0]) if pl else sg
    else:
        sg = rng.choice(_NOUN_LIST)
        noun = NOUNS[sg] if pl else sg
    det = "the" if rng.random() < 0.6 else rng.choice(DETERMINERS)
    words = [det]
    if rng.random() < p_adj:
        words.append(rng.choice(ADJECTIVES))
    return words + [noun], pl


def _agree(verbs: Mapping[str, str], plural: bool, rng: random.Random) -> str:
    """A random verb of ``verbs`` (plural -> 3sg) agreeing with ``plural``."""
    v = rng.choice(list(verbs))
    return v if plural else verbs[v]


def _corpus_sentence(rng: random.Random, p_adj: float) -> str:
    """One grammatical sentence of a randomly chosen corpus frame."""
    frame = rng.randrange(9)
    if frame <= 4:  # agreement frames, with optional adverb / object
        subj, pl = _corpus_np(rng, p_adj)
        words = list(subj)
        kind = rng.randrange(4)
        if kind == 1:
            words += [rng.choice(PREPOSITIONS)] + _corpus_np(rng, p_adj)[0]
        elif kind == 2:
            obj, opl = _corpus_np(rng, p_adj)
            words += ["that"] + obj + [_agree(TRANSITIVE_VERBS, opl, rng)]
        elif kind == 3:
            words += ["that", rng.choice(PAST_VERBS)] + _corpus_np(rng, p_adj)[0]
        if frame in (0, 1):
            words += [_agree(INTRANSITIVE_VERBS, pl, rng)]
            if rng.random() < 0.5:
                words.append(rng.choice(ADVERBS))
        elif frame in (2, 3):
            words += [_agree(TRANSITIVE_VERBS, pl, rng)] + _corpus_np(rng, p_adj)[0]
        else:
            words += [_agree(INTRANSITIVE_VERBS, pl, rng), "and"]
            words += [_agree(INTRANSITIVE_VERBS, pl, rng)]
        return " ".join(words)
    # anaphora frames (always agreeing)
    ante = rng.choice(_PERSON_LIST)
    plural_form, gender = PERSONS[ante]
    pl = rng.random() < 0.5
    words = ["the" if rng.random() < 0.6 else rng.choice(DETERMINERS)]
    if rng.random() < p_adj:
        words.append(rng.choice(ADJECTIVES))
    words.append(plural_form if pl else ante)
    kind = rng.randrange(3)
    if kind == 1:
        obj, opl = _corpus_np(rng, p_adj, people=True)
        words += ["who"] + obj + [_agree(TRANSITIVE_VERBS, opl, rng)]
    elif kind == 2:
        words += [rng.choice(PREPOSITIONS)] + _corpus_np(rng, p_adj, people=True)[0]
    words += [rng.choice(PAST_VERBS), PLURAL_REFLEXIVE if pl else REFLEXIVES[gender]]
    if rng.random() < 0.3:
        words.append(rng.choice(ADVERBS))
    return " ".join(words)


# ----- factories ---------
def agreement_task(plural: bool = False, cfg: GrammarConfig | None = None) -> AgreementTask:
    """``agreement_singular`` (rule: singular subject and verb) or ``agreement_plural``."""
    num = "plural" if plural else "singular"
    return AgreementTask(
        name=f"agreement_{num}",
        rule={"subject_plural": plural, "verb_plural": plural},
        description=(
            f"subject-verb agreement with attractors; positives have a {num} subject and a "
            f"{num} verb"
        ),
        cfg=cfg,
    )


def anaphora_task(plural: bool = False, cfg: GrammarConfig | None = None) -> AnaphoraTask:
    """``anaphora_singular`` (rule: singular antecedent and reflexive) or ``anaphora_plural``."""
    num = "plural" if plural else "singular"
    return AnaphoraTask(
        name=f"anaphora_{num}",
        rule={"antecedent_plural": plural, "reflexive_plural": plural},
        description=(
            f"reflexive anaphora with and without an intervening clause; positives have a {num} "
            f"antecedent and a {num} reflexive"
        ),
        cfg=cfg,
    )
