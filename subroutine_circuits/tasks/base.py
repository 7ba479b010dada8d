"""The task abstraction: predicates, samplers, odd-one-out problems, label examples and splits.

A compositional task is a set of named binary predicates over stimuli (texts) plus a sampler
that draws a stimulus with requested predicate values. Everything else (odd-one-out problems of
every kind, label-token examples, seeded train/val/test splits) is derived here generically from
``Task.sample`` / ``Task.sample_where``.

Splits: every stimulus text is assigned to exactly one split by a stable hash of
``"{seed}:{text}"`` (sha256, never Python's salted ``hash``) and the bucket fractions
``DEFAULT_BUCKET_FRACTIONS`` (train 0.6, val 0.2, test 0.2). A sample drawn for one split whose
text hashes into another split is rejected, so no text ever appears in two splits, and OOO
problems and label examples built with the same seed share the same text-to-split assignment.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SPLITS: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_BUCKET_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)
DEFAULT_SPLIT_SIZES: tuple[float, float, float] = (1.0, 0.25, 0.25)
LABEL_WORDS: dict[bool, str] = {True: "yes", False: "no"}


def format_values(values: Mapping[str, bool]) -> str:
    """Human-readable ``pred=True, pred2=False`` string of a predicate assignment."""
    return ", ".join(f"{k}={bool(v)}" for k, v in values.items())


@dataclass(frozen=True)
class Stimulus:
    """One stimulus: its text and the value of every predicate of its task."""

    text: str
    values: dict[str, bool] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.text, tuple(sorted(self.values.items()))))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict ``{"text": ..., "values": {...}}``."""
        return {"text": self.text, "values": dict(self.values)}


@dataclass
class OOOProblem:
    """An odd-one-out problem: 4 texts, the index of the one that breaks the rule.

    ``values[i]`` holds the predicate values of ``stimuli[i]``; ``kind`` is ``"composite"``,
    ``"sub_<pred>"`` or ``"partition_<pred>"``.
    """

    stimuli: list[str]
    odd_index: int
    kind: str
    values: list[dict[str, bool]]

    def __post_init__(self) -> None:
        if len(self.stimuli) != 4:
            raise ValueError(f"an OOO problem needs 4 stimuli, got {len(self.stimuli)}")
        if not 0 <= int(self.odd_index) < 4:
            raise ValueError(f"odd_index must be in 0..3, got {self.odd_index}")
        if len(self.values) != 4:
            raise ValueError(f"an OOO problem needs 4 value dicts, got {len(self.values)}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the format of the data CLI's JSONL lines)."""
        return {
            "stimuli": list(self.stimuli),
            "odd_index": int(self.odd_index),
            "kind": self.kind,
            "values": [dict(v) for v in self.values],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> OOOProblem:
        """Inverse of :meth:`to_json`; a missing key raises ValueError naming it."""
        for key in ("stimuli", "odd_index", "kind", "values"):
            if key not in d:
                raise ValueError(f"OOO problem JSON lacks the key {key!r}")
        return cls(
            stimuli=[str(s) for s in d["stimuli"]],
            odd_index=int(d["odd_index"]),
            kind=str(d["kind"]),
            values=[{str(k): bool(v) for k, v in vals.items()} for vals in d["values"]],
        )


@dataclass
class LabelExample:
    """A label-token example: the text, whether it satisfies the rule, and its label word."""

    text: str
    label: bool
    kind: str
    values: dict[str, bool]

    @property
    def label_word(self) -> str:
        """``"yes"`` if the text satisfies the rule, else ``"no"``."""
        return LABEL_WORDS[self.label]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "text": self.text,
            "label": self.label,
            "label_word": self.label_word,
            "kind": self.kind,
            "values": dict(self.values),
        }


class Task:
    """A compositional task: named binary predicates and a sampler of stimuli.

    Subclasses implement :meth:`sample`, :meth:`minimal_pair`, :meth:`corpus` and
    :meth:`vocabulary`. ``rule`` maps predicates to the values the positives of an OOO problem
    share (the compositional tasks have exactly two predicates, A and B, in that order).
    """

    name: str = "task"
    predicates: tuple[str, ...] = ()
    rule: dict[str, bool] = {}
    description: str = ""

    # ----- to implement ------------------------------------------------------------------------
    def sample(self, values: Mapping[str, bool], rng: random.Random) -> Stimulus:
        """Draw a stimulus whose predicates take ``values`` (missing predicates: random)."""
        raise NotImplementedError

    def minimal_pair(
        self, values: Mapping[str, bool], flip: str, rng: random.Random
    ) -> tuple[Stimulus, Stimulus]:
        """Two stimuli: the first with ``values``, the second the same with ``flip`` negated."""
        raise NotImplementedError

    def corpus(self, n: int, rng: random.Random) -> list[str]:
        """``n`` unlabelled texts for self-supervised pretraining."""
        raise NotImplementedError

    def vocabulary(self) -> list[str]:
        """Every word a stimulus or corpus text of this task can contain."""
        raise NotImplementedError

    # ----- generic -----------------------------------------------------------------------------
    def tokenizer(self):
        """A :class:`WordTokenizer` covering the task's whole vocabulary (plus specials)."""
        from subroutine_circuits.tasks.tokenizer import WordTokenizer

        return WordTokenizer(self.vocabulary())

    def check_values(self, values: Mapping[str, bool], what: str = "values") -> dict[str, bool]:
        """Validate a (partial) predicate assignment; unknown predicates raise ValueError."""
        out: dict[str, bool] = {}
        for k, v in values.items():
            if k not in self.predicates:
                raise ValueError(
                    f"unknown predicate {k!r} in {what} of task {self.name!r}; "
                    f"known predicates: {', '.join(self.predicates)}"
                )
            if not isinstance(v, bool):
                raise ValueError(f"{what}[{k!r}] must be a bool, got {v!r}")
            out[k] = v
        return out

    def with_rule(self, rule: Mapping[str, bool] | None) -> Task:
        """A shallow copy of this task with another rule (``None``: unchanged)."""
        if rule is None:
            return self
        checked = self.check_values(rule, what="rule")
        if not checked:
            raise ValueError(f"the rule of task {self.name!r} must name at least one predicate")
        new = copy.copy(self)
        new.rule = checked
        return new

    def full_values(self, values: Mapping[str, bool], rng: random.Random) -> dict[str, bool]:
        """Complete a partial assignment with uniformly random values for missing predicates."""
        values = self.check_values(values)
        return {p: values[p] if p in values else rng.random() < 0.5 for p in self.predicates}

    def available(
        self, values: Mapping[str, bool], accept: Callable[[str], bool] | None = None
    ) -> int | None:
        """How many distinct stimuli with ``values`` (and accepted) exist; None = unlimited."""
        return None

    def sample_where(
        self,
        values: Mapping[str, bool],
        rng: random.Random,
        accept: Callable[[str], bool] | None = None,
        max_tries: int = 5000,
    ) -> Stimulus:
        """Like :meth:`sample`, but only returns stimuli whose text passes ``accept``."""
        for _ in range(max_tries):
            s = self.sample(values, rng)
            if accept is None or accept(s.text):
                return s
        raise ValueError(
            f"task {self.name!r}: no accepted stimulus with {format_values(values)} "
            f"after {max_tries} tries"
        )

    def problem_kinds(self, rule: Mapping[str, bool] | None = None) -> list[str]:
        """``["composite", "sub_<p>"..., "partition_<p>"...]`` for the predicates of the rule."""
        rule = self.rule if rule is None else rule
        preds = [p for p in self.predicates if p in rule]
        return ["composite"] + [f"sub_{p}" for p in preds] + [f"partition_{p}" for p in preds]

    def to_json(self) -> dict[str, Any]:
        """Name, predicates, rule and description as a dict."""
        return {
            "name": self.name,
            "predicates": list(self.predicates),
            "rule": dict(self.rule),
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, rule={self.rule!r})"


# ----- splits ----------------------------------------------------------------------------------
def split_of(text: str, seed: int, fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS) -> str:
    """The split (``"train"``, ``"val"`` or ``"test"``) a text belongs to for this seed.

    Stable across processes: a sha256 of ``"{seed}:{text}"`` mapped to [0, 1) and compared
    with the cumulative ``fractions``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"bucket fractions must be 3 non-negative numbers, got {fractions!r}")
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    total = float(sum(fractions))
    acc = 0.0
    for name, f in zip(SPLITS, fractions):
        acc += f / total
        if u < acc:
            return name
    return SPLITS[-1]


def split_filter(
    split: str | None, seed: int, fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS
) -> Callable[[str], bool] | None:
    """A text filter keeping texts of ``split`` (``None``: no filter)."""
    if split is None:
        return None
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if fractions[SPLITS.index(split)] <= 0:
        raise ValueError(f"split {split!r} has bucket fraction 0; it can hold no stimulus")
    return lambda text: split_of(text, seed, fractions) == split


# ----- problem construction ----------------------------------------------------------------------
def _kind_spec(
    task: Task, kind: str, rule: Mapping[str, bool]
) -> tuple[dict[str, bool], list[dict[str, bool]]]:
    """For a kind: the fixed values of the positives and the list of odd-one value options.

    Predicates not fixed in the returned dicts are drawn uniformly at random per stimulus.
    """
    preds = [p for p in task.predicates if p in rule]
    if kind == "composite":
        options = []
        for r in range(1, len(preds) + 1):
            for broken in itertools.combinations(preds, r):
                options.append({p: (not rule[p]) if p in broken else rule[p] for p in preds})
        return dict(rule), options
    if kind.startswith("sub_"):
        p = kind[4:]
        if p not in preds:
            raise ValueError(_unknown_kind(task, kind, rule))
        return {p: rule[p]}, [{p: not rule[p]}]
    if kind.startswith("partition_"):
        p = kind[len("partition_") :]
        if p not in preds:
            raise ValueError(_unknown_kind(task, kind, rule))
        odd = dict(rule)
        odd[p] = not rule[p]
        return dict(rule), [odd]
    raise ValueError(_unknown_kind(task, kind, rule))


def _unknown_kind(task: Task, kind: str, rule: Mapping[str, bool]) -> str:
    return (
        f"unknown problem kind {kind!r} for task {task.name!r}; "
        f"known kinds: {', '.join(task.problem_kinds(rule))}"
    )


def _completions(task: Task, fixed: Mapping[str, bool]) -> list[dict[str, bool]]:
    """Every full assignment consistent with the partial assignment ``fixed``."""
    free = [p for p in task.predicates if p not in fixed]
    out = []
    for bits in itertools.product([False, True], repeat=len(free)):
        full = dict(fixed)
        full.update(zip(free, bits))
        out.append({p: full[p] for p in task.predicates})
    return out


def _check_available(
    task: Task,
    kind: str,
    n: int,
    fixed: Mapping[str, bool],
    odd_options: list[dict[str, bool]],
    accept: Callable[[str], bool] | None,
    split: str | None,
) -> None:
    """Raise ValueError if some predicate combination has too few stimuli for ``kind``."""
    needs: list[tuple[dict[str, bool], int]] = [(c, 3) for c in _completions(task, fixed)]
    for opt in odd_options:
        needs += [(c, 1) for c in _completions(task, opt)]
    where = f" in split {split!r}" if split else ""
    for combo, need in needs:
        have = task.available(combo, accept)
        if have is not None and have < need:
            raise ValueError(
                f"too few stimuli with {format_values(combo)}{where} of task {task.name!r} "
                f"to build {n} {kind!r} problems: need at least {need} distinct, found {have}"
            )


def make_problems(
    task: Task,
    kind: str,
    n: int,
    rng: random.Random | int,
    rule: Mapping[str, bool] | None = None,
    split: str | None = None,
    seed: int = 0,
    bucket_fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS,
) -> list[OOOProblem]:
    """``n`` odd-one-out problems of one kind.

    - ``composite``: 3 positives satisfy every rule predicate; the odd one breaks a non-empty
      subset of them (A only, B only, both: equally often, balanced to within one problem).
    - ``sub_<p>``: positives satisfy ``p`` and are random on the others; the odd one breaks
      ``p`` and is random on the others.
    - ``partition_<p>``: positives satisfy every rule predicate; the odd one breaks only ``p``.

    Every stimulus is sampled independently (so positives vary in their words), the 4 texts of a
    problem are distinct, and the odd position is uniform: positions are balanced over the ``n``
    problems (each used ``n // 4`` or ``n // 4 + 1`` times) in shuffled order. With ``split``,
    only texts hashed into that split (``split_of(text, seed, bucket_fractions)``) are used.
    ``rng`` is a ``random.Random`` or an int seed.
    """
    if n < 0:
        raise ValueError(f"number of problems must be >= 0, got {n}")
    rng = random.Random(rng) if isinstance(rng, int) else rng
    rule = task.check_values(task.rule if rule is None else rule, what="rule")
    if not rule:
        raise ValueError(f"the rule of task {task.name!r} is empty")
    fixed, odd_options = _kind_spec(task, kind, rule)
    accept = split_filter(split, seed, bucket_fractions)
    if n == 0:
        return []
    _check_available(task, kind, n, fixed, odd_options, accept, split)
    option_ids = [i % len(odd_options) for i in range(n)]
    rng.shuffle(option_ids)
    positions = [i % 4 for i in range(n)]
    rng.shuffle(positions)
    problems = []
    for i in range(n):
        odd_index = positions[i]
        stimuli: list[Stimulus] = []
        for pos in range(4):
            want = odd_options[option_ids[i]] if pos == odd_index else fixed
            for _ in range(200):
                s = task.sample_where(task.full_values(want, rng), rng, accept)
                if all(s.text != t.text for t in stimuli):
                    break
            else:
                raise ValueError(
                    f"task {task.name!r}: could not draw 4 distinct stimuli for a {kind!r} problem"
                )
            stimuli.append(s)
        problems.append(
            OOOProblem(
                stimuli=[s.text for s in stimuli],
                odd_index=odd_index,
                kind=kind,
                values=[dict(s.values) for s in stimuli],
            )
        )
    return problems


def _split_counts(
    n_per_kind: Mapping[str, int], split_sizes: Sequence[float | int]
) -> dict[str, dict[str, int]]:
    """Per split and kind, the number of problems (see :func:`make_splits`)."""
    if len(split_sizes) != 3:
        raise ValueError(f"split_sizes must have 3 entries (train, val, test), got {split_sizes!r}")
    if any(s < 0 for s in split_sizes):
        raise ValueError(f"split_sizes must be non-negative, got {split_sizes!r}")
    all_int = all(isinstance(s, int) and not isinstance(s, bool) for s in split_sizes)
    out: dict[str, dict[str, int]] = {}
    for split, size in zip(SPLITS, split_sizes):
        out[split] = {}
        for kind, n in n_per_kind.items():
            out[split][kind] = (int(size) if n > 0 else 0) if all_int else int(round(n * size))
    return out


def make_splits(
    task: Task,
    n_per_kind: Mapping[str, int] | int,
    seed: int,
    rule: Mapping[str, bool] | None = None,
    split_sizes: Sequence[float | int] = DEFAULT_SPLIT_SIZES,
    bucket_fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS,
) -> dict[str, dict[str, list[OOOProblem]]]:
    """Seeded train/val/test OOO problems of every kind: ``splits[split][kind]``.

    ``n_per_kind``: the number of *train* problems per kind (an int for every kind of
    ``task.problem_kinds(rule)``, or a dict kind -> int; kinds left out get none).
    ``split_sizes``: floats are multipliers of ``n_per_kind`` per split (default
    ``(1.0, 0.25, 0.25)``: val and test get a quarter of train); ints are absolute numbers per
    kind for each split. No stimulus text appears in two splits (texts are assigned to splits by
    a hash of ``"{seed}:{text}"``, see :func:`split_of`). Deterministic given ``seed``.
    """
    rule = task.check_values(task.rule if rule is None else rule, what="rule")
    kinds = task.problem_kinds(rule)
    if isinstance(n_per_kind, int):
        n_per_kind = {k: n_per_kind for k in kinds}
    for k, n in n_per_kind.items():
        if k not in kinds:
            raise ValueError(_unknown_kind(task, k, rule))
        if n < 0:
            raise ValueError(f"n_per_kind[{k!r}] must be >= 0, got {n}")
    counts = _split_counts(n_per_kind, split_sizes)
    out: dict[str, dict[str, list[OOOProblem]]] = {}
    for si, split in enumerate(SPLITS):
        out[split] = {}
        for ki, kind in enumerate(n_per_kind):
            rng = random.Random(f"{seed}:{si}:{ki}:{kind}")
            out[split][kind] = make_problems(
                task,
                kind,
                counts[split][kind],
                rng,
                rule=rule,
                split=split,
                seed=seed,
                bucket_fractions=bucket_fractions,
            )
    return out


def make_label_examples(
    task: Task,
    n: int,
    seed: int,
    kind: str = "composite",
    rule: Mapping[str, bool] | None = None,
    split: str | None = None,
    bucket_fractions: Sequence[float] = DEFAULT_BUCKET_FRACTIONS,
) -> list[LabelExample]:
    """``n`` label-token examples (half yes, half no, shuffled) of one kind.

    ``label`` is True (word ``"yes"``) when the text satisfies the kind's rule:
    composite: every rule predicate (negatives break A, B or both equally often);
    ``sub_<p>``: ``p`` only (others random); ``partition_<p>``: positives satisfy all, negatives
    break only ``p``. ``split`` restricts texts to one split of ``seed`` (as in make_splits).
    """
    if n < 0:
        raise ValueError(f"number of examples must be >= 0, got {n}")
    rng = random.Random(f"label:{seed}:{kind}:{split}")
    rule = task.check_values(task.rule if rule is None else rule, what="rule")
    fixed, odd_options = _kind_spec(task, kind, rule)
    accept = split_filter(split, seed, bucket_fractions)
    if n == 0:
        return []
    _check_available(task, kind, n, fixed, odd_options, accept, split)
    labels = [i % 2 == 0 for i in range(n)]
    rng.shuffle(labels)
    neg_ids = [i % len(odd_options) for i in range(n)]
    rng.shuffle(neg_ids)
    out = []
    for i, lab in enumerate(labels):
        want = fixed if lab else odd_options[neg_ids[i]]
        s = task.sample_where(task.full_values(want, rng), rng, accept)
        out.append(LabelExample(text=s.text, label=lab, kind=kind, values=dict(s.values)))
    return out
