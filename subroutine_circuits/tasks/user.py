"""Users' own tasks from a JSONL or CSV file.

File format: one stimulus per row (JSONL: one JSON object per line; CSV: a header row), with

- ``text``: the stimulus (words separated by whitespace);
- one boolean column per predicate. Accepted values: JSON ``true``/``false``, ``1``/``0``, and
  (case-insensitive) the strings ``"true"``/``"false"``, ``"1"``/``"0"``, ``"yes"``/``"no"``;
- optionally ``pair_id``: rows sharing a ``pair_id`` are variants of one item (used for minimal
  pairs).

Predicates: ``predicates=None`` takes every column except ``text`` and ``pair_id`` in file order
(the CSV header / the first JSONL object's keys).

Rule: the predicate values the positives of an OOO problem share. ``rule=None`` means every
predicate must be True (``{p: True for p in predicates}``).

Sampling: :meth:`UserTask.sample` draws uniformly among the distinct texts of the requested
predicate combination (a predicate left out of ``values`` is drawn uniformly first). Identical
texts with identical values are merged; the same text with conflicting values is an error.

Minimal pairs: with a ``pair_id`` column, ``minimal_pair(values, flip)`` picks a pair_id group
holding a row with ``values`` and a row with ``values`` except ``flip`` negated. Without it, two
rows whose texts have the same number of words and differ in exactly one word (and whose values
differ in exactly ``flip``) form a pair. If no such pair exists, ValueError says so.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from subroutine_circuits.tasks.base import Stimulus, Task, format_values

RESERVED_COLUMNS: tuple[str, ...] = ("text", "pair_id")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def parse_bool(value: Any, where: str) -> bool:
    """Parse a boolean cell; anything but true/false, 1/0, yes/no raises ValueError at ``where``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise ValueError(f"{where}: non-boolean value {value!r} (use true/false, 1/0 or yes/no)")


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """(columns in file order, [(line number, row dict)]) of a JSONL or CSV file."""
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    columns: list[str] = []
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
                if not columns:
                    columns = list(obj)
                rows.append((lineno, obj))
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            for row in reader:
                rows.append((reader.line_num, {k.strip(): v for k, v in row.items() if k}))
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv")
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    return columns, rows


class UserTask(Task):
    """A task whose stimuli are the rows of a user's file (see the module docstring)."""

    def __init__(
        self,
        name: str,
        stimuli: Sequence[Stimulus],
        predicates: Sequence[str],
        rule: Mapping[str, bool] | None = None,
        pair_ids: Mapping[str, str] | None = None,
        description: str = "",
        source: str = "",
    ) -> None:
        if not predicates:
            raise ValueError(f"user task {name!r} needs at least one predicate column")
        self.name = name
        self.predicates = tuple(predicates)
        self.source = source
        self.description = description or f"user task from {source or 'memory'}"
        self.stimuli = list(stimuli)
        if not self.stimuli:
            raise ValueError(f"user task {name!r} has no stimuli")
        self.pair_ids = dict(pair_ids or {})
        self._by_combo: dict[tuple[bool, ...], list[Stimulus]] = defaultdict(list)
        for s in self.stimuli:
            self._by_combo[self._key(s.values)].append(s)
        rule = {p: True for p in self.predicates} if rule is None else rule
        self.rule = self.check_values(rule, what="rule")
        if not self.rule:
            raise ValueError(f"the rule of user task {name!r} must name at least one predicate")

    def _key(self, values: Mapping[str, bool]) -> tuple[bool, ...]:
        return tuple(bool(values[p]) for p in self.predicates)

    def _pool(
        self, values: Mapping[str, bool], accept: Callable[[str], bool] | None
    ) -> list[Stimulus]:
        """Stimuli matching a full assignment and the text filter."""
        pool = self._by_combo.get(self._key(values), [])
        return pool if accept is None else [s for s in pool if accept(s.text)]

    def available(self, values, accept=None) -> int | None:
        """Number of distinct stimuli with exactly ``values`` (full) passing ``accept``."""
        return len(self._pool(values, accept))

    def counts(self) -> dict[str, int]:
        """Number of stimuli per predicate combination (``"p=True, q=False"`` -> count)."""
        return {
            format_values(dict(zip(self.predicates, k))): len(v)
            for k, v in sorted(self._by_combo.items())
        }

    def sample_where(self, values, rng, accept=None, max_tries: int = 0) -> Stimulus:
        """A uniformly drawn row with ``values`` whose text passes ``accept``."""
        full = self.full_values(values, rng)
        pool = self._pool(full, accept)
        if not pool:
            raise ValueError(
                f"user task {self.name!r}: no stimulus with {format_values(full)}"
                f"{' in the requested split' if accept else ''}; "
                f"stimuli per combination: {self.counts()}"
            )
        return rng.choice(pool)

    def sample(self, values: Mapping[str, bool], rng: random.Random) -> Stimulus:
        """A uniformly drawn row of the file with ``values`` (missing predicates random)."""
        return self.sample_where(values, rng)

    def minimal_pair(
        self, values: Mapping[str, bool], flip: str, rng: random.Random
    ) -> tuple[Stimulus, Stimulus]:
        """Two rows differing exactly in ``flip`` (by ``pair_id``, else by a one-word edit)."""
        if flip not in self.predicates:
            raise ValueError(
                f"unknown predicate {flip!r} to flip; "
                f"known predicates: {', '.join(self.predicates)}"
            )
        full = self.full_values(values, rng)
        other = dict(full)
        other[flip] = not full[flip]
        pairs = self._pairs(full, other)
        if not pairs:
            how = "pair_id group" if self.pair_ids else "pair of texts differing in one word"
            raise ValueError(
                f"user task {self.name!r}: no minimal pair for {flip!r} from "
                f"{format_values(full)}: no {how} holds both combinations"
                + ("" if self.pair_ids else " (add a pair_id column to declare pairs)")
            )
        return rng.choice(pairs)

    def _pairs(
        self, a: Mapping[str, bool], b: Mapping[str, bool]
    ) -> list[tuple[Stimulus, Stimulus]]:
        """All (row with ``a``, row with ``b``) minimal pairs."""
        left = self._by_combo.get(self._key(a), [])
        right = self._by_combo.get(self._key(b), [])
        out = []
        if self.pair_ids:
            groups: dict[str, list[Stimulus]] = defaultdict(list)
            for s in right:
                if s.text in self.pair_ids:
                    groups[self.pair_ids[s.text]].append(s)
            for s in left:
                pid = self.pair_ids.get(s.text)
                if pid is not None:
                    out += [(s, t) for t in groups.get(pid, [])]
            return out
        index: dict[tuple[int, tuple[str, ...]], list[Stimulus]] = defaultdict(list)
        for s in right:
            words = s.text.split()
            for i in range(len(words)):
                index[(i, tuple(words[:i] + ["\0"] + words[i + 1 :]))].append(s)
        for s in left:
            words = s.text.split()
            for i in range(len(words)):
                for t in index.get((i, tuple(words[:i] + ["\0"] + words[i + 1 :])), []):
                    if t.text != s.text:
                        out.append((s, t))
        return out

    def corpus(self, n: int, rng: random.Random) -> list[str]:
        """``n`` texts of the file drawn uniformly with replacement."""
        if n < 0:
            raise ValueError(f"corpus size must be >= 0, got {n}")
        texts = [s.text for s in self.stimuli]
        return [rng.choice(texts) for _ in range(n)]

    def vocabulary(self) -> list[str]:
        """Every word of the file's texts (sorted)."""
        words: set[str] = set()
        for s in self.stimuli:
            words.update(s.text.split())
        return sorted(words)


def load_user_task(
    path: str | os.PathLike,
    rule: Mapping[str, bool] | None = None,
    predicates: Sequence[str] | None = None,
    name: str | None = None,
) -> UserTask:
    """A :class:`UserTask` from a JSONL or CSV file (format in the module docstring).

    Errors (ValueError) name the problem: a missing column (which), an unknown predicate in the
    rule (which; the known ones listed), a non-boolean value (file line number), an empty text,
    the same text with conflicting values (both line numbers). Too few stimuli of a predicate
    combination is reported when problems are built (:func:`make_problems`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"user task file not found: {path}")
    columns, rows = _read_rows(path)
    if "text" not in columns:
        raise ValueError(f"{path}: missing column 'text' (columns: {', '.join(columns)})")
    if predicates is None:
        predicates = [c for c in columns if c not in RESERVED_COLUMNS]
        if not predicates:
            raise ValueError(f"{path}: no predicate columns besides {RESERVED_COLUMNS}")
    else:
        predicates = list(predicates)
        for p in predicates:
            if p in RESERVED_COLUMNS:
                raise ValueError(f"{path}: {p!r} is a reserved column, not a predicate")
            if p not in columns:
                raise ValueError(
                    f"{path}: missing column {p!r} for predicate {p!r} "
                    f"(columns: {', '.join(columns)})"
                )
    has_pairs = "pair_id" in columns
    seen: dict[str, tuple[int, dict[str, bool]]] = {}
    stimuli: list[Stimulus] = []
    pair_ids: dict[str, str] = {}
    for lineno, row in rows:
        for col in ["text", *predicates]:
            if col not in row or row[col] is None:
                raise ValueError(f"{path}:{lineno}: missing column {col!r}")
        text = " ".join(str(row["text"]).split())
        if not text:
            raise ValueError(f"{path}:{lineno}: empty text")
        values = {p: parse_bool(row[p], f"{path}:{lineno}: column {p!r}") for p in predicates}
        if text in seen:
            first, old = seen[text]
            if old != values:
                raise ValueError(
                    f"{path}:{lineno}: text {text!r} repeats line {first} with other values "
                    f"({format_values(values)} vs {format_values(old)})"
                )
            continue
        seen[text] = (lineno, values)
        stimuli.append(Stimulus(text, values))
        if has_pairs and row.get("pair_id") not in (None, ""):
            pair_ids[text] = str(row["pair_id"])
    if rule is not None:
        for p in rule:
            if p not in predicates:
                raise ValueError(
                    f"unknown predicate {p!r} in the rule; "
                    f"known predicates: {', '.join(predicates)}"
                )
    return UserTask(
        name=name or path.stem,
        stimuli=stimuli,
        predicates=predicates,
        rule=rule,
        pair_ids=pair_ids if has_pairs else None,
        source=str(path),
    )
