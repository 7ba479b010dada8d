"""The study's patching driver: for one subroutine of a task, patching scores, circuits and
their comparison with the subroutine's mask.

:func:`run_patching` is what the experiment's patching stage and ``subroutine-circuits patch``
call; it uses the generic library :mod:`subroutine_circuits.patching`.
For OOO models (embed 4 stimuli, L2-normalise, ``s_i = -sum_{j != i} <x_i, x_j>``) the metric of
a minimal pair for subroutine ``p`` is the oddness score of the stimulus among 3 fixed context
stimuli that satisfy the rule (their embeddings are computed once, unpatched); the clean input
breaks ``p`` (it is the odd one), the corrupted input is its minimal pair with ``p`` restored.
For label-token models the metric is ``logit[yes] - logit[no]`` at the last position.
Pairs are grouped by token count, so no padding is needed; results of the groups are merged.

No test data decides anything, and no mask-training data is measured on. The pairs form two
DISJOINT sets (no clean or corrupted text in both), each from its own split of the study's hash
split (``cfg.split_seed``: :func:`subroutine_circuits.tasks.split_of`; the clean, corrupted and
context texts of a pair all come from its set's split):

- *scoring* pairs, from the ``val`` split (``cfg.score_split``), decide which units matter and
  which circuit is chosen (scores, top-k, smallest faithful circuit);
- *faithfulness* pairs, from the ``test`` split (``cfg.split``), measure the chosen circuits
  (faithfulness curve, CPR / CMD, ``f_k``, ``f_faithful``).

patching.csv names the split of each set (``score_split``, ``faith_split``). Image tasks draw
the two sets from the shape world's independent seeded ``val`` and ``test`` pair streams
(:func:`subroutine_circuits.experiment.vision.image_pair_batch`).
Thin data: when a split holds fewer minimal pairs than asked, its set has the pairs found and a
:class:`PairShortageWarning` says so (when both sets come from one split, the pairs found are
shared between them in the asked ratio); with no scoring or no faithfulness pair the subroutine
is skipped (a ``skipped`` row), never the study.
Cross-ablation removes the circuit (chosen on the scoring pairs) with the mask experiment's
ablation, whose mean values come from the mask experiment's reference set (training composite
problems, position-aware), and measures accuracy on the test partitions.
"""

from __future__ import annotations

import math
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from subroutine_circuits.adapters import as_adapter
from subroutine_circuits.masks.units import UnitGroup
from subroutine_circuits.patching.activation import activation_patching
from subroutine_circuits.patching.attribution import attribution_patching, integrated_gradients
from subroutine_circuits.patching.circuits import (
    DEFAULT_FRACTIONS,
    PatchBatch,
    circuit_metrics,
    faithfulness_curve,
    smallest_faithful_circuit,
    top_k_circuit,
)
from subroutine_circuits.patching.compare import compare_with_mask
from subroutine_circuits.patching.frontier import (
    MIB_FRACTIONS,
    frontier,
    frontier_rows,
    mask_order,
    random_orders,
    score_order,
    sizes_of,
)
from subroutine_circuits.patching.scores import PatchScores, merge_scores
from subroutine_circuits.utils import CHANCE, clipped_diff

METHODS = ("activation", "attribution", "integrated_gradients")
READOUT_KINDS = ("ooo", "label")
#: Values of ``PatchingConfig.split`` / ``score_split`` (None: every text, no split).
PAIR_SPLITS = (None, "train", "val", "test")
#: The shape-world stream an image task draws a pair set from when its split is None.
IMAGE_PAIR_SPLIT = "test"


@dataclass
class PatchingConfig:
    """Settings of :func:`run_patching` (defaults work for the library's OOO models).

    - ``methods``: any of ``activation``, ``attribution``, ``integrated_gradients``.
    - ``n_pairs``: minimal pairs per subroutine; ``seed`` seeds their sampling. A split with
      fewer pairs gives those it has (:class:`PairShortageWarning`; none: the subroutine is
      skipped, see :func:`run_patching`).
    - ``readout``: ``ooo`` (odd-one-out embedding models) or ``label`` (yes/no token).
    - ``pool``: ``last`` / ``mean`` / None (the model's own ``sc_pool``, else last).
    - ``curve_ablation``: ablation of the complement in faithfulness curves (``resample`` =
      the corrupted activation, MIB's convention; or ``mean`` / ``zero``).
    - ``n_faith_pairs``: minimal pairs measuring faithfulness (disjoint from the ``n_pairs``
      scoring pairs; None: as many as ``n_pairs``).
    - ``score_split`` / ``split`` / ``split_seed``: the scoring pairs (which choose the
      circuit) come from ``score_split`` (default ``val``), the faithfulness pairs (which
      measure it) from ``split`` (default ``test``), of the task's hash split with
      ``split_seed`` (the study's ``[data] seed``); every clean, corrupted and context text of
      a pair is of its set's split. Each is ``train``, ``val``, ``test`` or None (no
      restriction). Scoring on the faithfulness split (or None) chooses the circuit on the data
      that measure it; with ``score_split == split`` the two sets share that split's pairs.
    - ``cross_ablation``: ablation used to remove the patching circuit before measuring OOO
      accuracy on the partitions: the mask experiment's ablation, ``zero`` or ``mean`` (means
      over the ``reference`` problems given to :func:`run_patching`, the mask experiment's
      reference set; separate means for readout and other positions when
      ``position_aware``).
    - ``circuit_size``: size of the patching circuit for Jaccard and cross-ablation:
      ``"mask"`` (the mask's kept count, else the smallest faithful circuit), ``"faithful"``
      (smallest circuit reaching ``faithfulness_target``) or an int.
    - ``ablation_curve_fractions``: circuit sizes (fractions of all units) of the accuracy
      curve "ablate the top-k patching units, measure target/other OOO accuracy".
    - ``out_dir``: if set, per-unit scores are saved there as ``scores_<sub>_<method>.pt``
      (keys: the ``meta`` items, ``subroutine``, ``method``, ``scores`` [n_units], ``units``
      [(layer, kind, index)], ``hooks``, ``normalised`` {hook: tensor}, ``circuit``,
      ``curve`` (MIB faithfulness curve), ``faithfulness`` ({k, target_acc, other_acc} or
      None), ``row``).
    - ``meta``: extra columns (e.g. task, init, base_seed) copied into every row and file.
    - ``circuits_dir``: if set, the mask and each method's circuit (size ``cfg.circuit_size``)
      are written there as MIB / EAP-IG circuit JSON (:mod:`subroutine_circuits.patching.
      mib_format`), ``[<meta values>_]<subroutine>_<mask|method>.json`` with the scores (mask
      logits, patching scores) on the nodes; models whose units are not heads and neurons
      (CNN channels) write none.
    - ``frontier``: measure the faithfulness-size frontier (:mod:`subroutine_circuits.
      patching.frontier`) of every ranking (the mask's own order, each method's scores,
      ``frontier_random`` random orders averaged) at ``frontier_fractions`` of the units (MIB's
      sizes) on the faithfulness pairs, with the subroutine's test accuracy of each circuit
      (its complement ablated as in the mask experiment); rows of ``frontier.csv``.
    """

    methods: tuple[str, ...] = ("activation", "attribution")
    n_pairs: int = 64
    seed: int = 0
    readout: str = "ooo"
    pool: str | None = None
    kinds: tuple[str, ...] = ("head", "neuron")
    curve_ablation: str = "resample"
    cross_ablation: str = "zero"
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    faithfulness_target: float = 0.8
    circuit_size: str | int = "mask"
    use_abs: bool = True
    ig_steps: int = 16
    chunk_rows: int = 4096
    batch_size: int = 256
    ablation_curve_fractions: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
    out_dir: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    n_faith_pairs: int | None = None
    split: str | None = "test"
    split_seed: int = 0
    score_split: str | None = "val"
    position_aware: bool = True
    agreement_perms: int = 2000
    circuits_dir: str | None = None
    frontier: bool = True
    frontier_fractions: tuple[float, ...] = MIB_FRACTIONS
    frontier_random: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown patching method(s) {bad or '(none)'}; choose from {METHODS}")
        if self.readout not in READOUT_KINDS:
            raise ValueError(f"unknown readout {self.readout!r}; choose one of {READOUT_KINDS}")
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")
        if self.n_faith_pairs is not None and self.n_faith_pairs < 1:
            raise ValueError(f"n_faith_pairs must be >= 1, got {self.n_faith_pairs}")
        for name in ("split", "score_split"):
            value = getattr(self, name)
            if value not in PAIR_SPLITS:
                raise ValueError(f"{name} must be 'train', 'val', 'test' or None, got {value!r}")
        if self.cross_ablation not in ("zero", "mean"):
            raise ValueError(
                f"cross_ablation must be 'zero' or 'mean' (inputs vary in length), "
                f"got {self.cross_ablation!r}"
            )
        if self.agreement_perms < 1:
            raise ValueError(f"agreement_perms must be >= 1, got {self.agreement_perms}")
        if self.frontier_random < 0:
            raise ValueError(f"frontier_random must be >= 0, got {self.frontier_random}")
        self.frontier_fractions = tuple(float(f) for f in self.frontier_fractions)
        sizes_of(self.frontier_fractions, 1000)  # raises on fractions outside (0, 1)
        if isinstance(self.circuit_size, str) and self.circuit_size not in ("mask", "faithful"):
            raise ValueError(
                f"circuit_size must be 'mask', 'faithful' or an int, got {self.circuit_size!r}"
            )


# ----------------------------------------------------------------------------- data


@dataclass
class PairData:
    """Minimal pairs of one subroutine, grouped by token count, ready for patching."""

    batches: list[PatchBatch]
    readout: str  # readout name for the patching functions
    n_pairs: int  # pairs used (aligned)
    texts: list[tuple[str, str]] = field(default_factory=list)
    # pairs whose stimuli could not be aligned token by token: (clean, corrupted, reason)
    unaligned: list[tuple[str, str, str]] = field(default_factory=list)
    n_asked: int = 0  # pairs asked for (n_pairs < n_asked: the data has fewer)
    shortage: str = ""  # why the draws gave fewer pairs than asked ("" when they did not)
    split: str | None = None  # the split the pairs come from (None: every text)

    @property
    def n_unaligned(self) -> int:
        """Sampled pairs left out because their tokens could not be aligned."""
        return len(self.unaligned)


def _adapter(model, tokenizer=None, pool: str | None = None):
    """The model's adapter (with the task's tokenizer and the readout's pooling)."""
    from subroutine_circuits.adapters.base import ModelAdapter

    if isinstance(model, ModelAdapter):
        return model
    return as_adapter(model, tokenizer=tokenizer, pool=pool)


Pair = tuple[str, str, list[str]]


def _accepted(task, values: Mapping[str, bool], rng: random.Random, accept) -> str:
    """The text of a stimulus with ``values`` that ``accept`` keeps."""
    if accept is None:
        return task.sample(values, rng).text
    return task.sample_where(values, rng, accept).text


class PairShortageWarning(UserWarning):
    """Fewer minimal pairs of a subroutine than asked exist in a patching split: a property
    of the data, not an error. Patching runs with the pairs found (``n_pairs`` /
    ``n_faith_pairs`` of patching.csv), or is skipped for that subroutine when none are."""


def _draw_pairs(
    task,
    subroutine: str,
    n: int,
    seed: int,
    n_context: int = 3,
    accept: Callable[[str], bool] | None = None,
    exclude: set[str] | None = None,
    max_tries: int = 2000,
) -> tuple[list[Pair], str | None]:
    """Up to ``n`` pairs as :func:`sample_pairs` draws them, and why fewer came (None: all ``n``
    did). Drawing stops at the first pair that cannot be completed: ``max_tries`` draws give no
    new accepted pair, the task has no minimal pair for the combination at all, or the pair's
    contexts cannot be drawn. With ``n`` pairs available nothing differs from a complete
    draw: the same random draws give the same pairs."""
    if subroutine not in task.predicates:
        raise ValueError(
            f"unknown subroutine {subroutine!r} for task {task.name!r}; "
            f"predicates: {', '.join(task.predicates)}"
        )
    rng = random.Random(seed)
    rule = dict(task.rule)
    broken = dict(rule)
    broken[subroutine] = not rule[subroutine]
    # every predicate fixed: each draw asks for the same combination, so a task that has no
    # minimal pair for it (minimal_pair raises) will never have one
    fixed = set(task.predicates) <= set(broken)
    used = set(exclude or ())
    out: list[Pair] = []
    for _ in range(n):
        failure: str | None = None
        for _try in range(max_tries):
            try:
                clean, corr = task.minimal_pair(broken, subroutine, rng)
            except ValueError as err:  # no minimal pair for this combination of values
                failure = str(err)
                if fixed:
                    return out, failure
                continue
            ok = accept is None or (accept(clean.text) and accept(corr.text))
            if ok and clean.text not in used and corr.text not in used:
                break
        else:
            why = f"no new minimal pair after {max_tries} draws"
            return out, why + (f" (last draw: {failure})" if failure else "")
        used.update((clean.text, corr.text))
        contexts: list[str] = []
        try:
            for _try in range(50 * n_context):
                if len(contexts) == n_context:
                    break
                t = _accepted(task, rule, rng, accept)
                if t not in contexts and t not in (clean.text, corr.text):
                    contexts.append(t)
        except ValueError as err:
            return out, f"no context stimulus satisfying the rule: {err}"
        if len(contexts) < n_context:
            return out, f"cannot sample {n_context} distinct context stimuli satisfying the rule"
        out.append((clean.text, corr.text, contexts))
    return out, None


def sample_pairs(
    task, subroutine: str, n: int, seed: int, *, split: str | None = None, **options: Any
) -> list[Pair]:
    """``n`` (clean, corrupted, contexts): clean breaks ``subroutine`` only, corrupted is its
    minimal pair with it restored (satisfies the rule), contexts satisfy the rule.
    ``options``: ``n_context`` (3), ``accept``, ``exclude``, ``max_tries`` (2000), as
    :func:`_draw_pairs` takes them.

    ``accept`` (a text filter, e.g. :func:`tasks.split_filter` of the test split) must keep the
    clean text, the corrupted text and every context. No clean or corrupted text occurs twice in
    the result or in ``exclude``. When the task has fewer such pairs (``max_tries`` draws give
    no new accepted pair, or none exists), the pairs found are returned, possibly none, with a
    :class:`PairShortageWarning` naming ``split`` (the split ``accept`` keeps, for the message).
    """
    pairs, why = _draw_pairs(task, subroutine, n, seed, **options)
    if why is not None:
        warnings.warn(
            PairShortageWarning(
                f"task {task.name!r}: {len(pairs)} of {n} minimal pairs for {subroutine!r} "
                f"{_split_words(split)} ({why})"
            ),
            stacklevel=2,
        )
    return pairs


def _split_words(split: str | None) -> str:
    """``in the 'test' split`` (or ``in all splits``), for messages."""
    return "in all splits" if split is None else f"in the {split!r} split"


def _split_label(split: str | None) -> str:
    """A split as patching.csv names it (``all``: no split)."""
    return "all" if split is None else split


def _same_pool(cfg: PatchingConfig) -> bool:
    """Whether the scoring and the faithfulness pairs are drawn from one split (they then
    share its pairs when it holds fewer than asked)."""
    return cfg.score_split == cfg.split


def _share(pairs: list[Pair], n_scoring: int, n_faith: int) -> tuple[list[Pair], list[Pair]]:
    """Found pairs (in draw order) shared between the scoring and the faithfulness set: the
    first ``n_scoring`` and the next ``n_faith`` when there are enough, else in the asked ratio
    with at least one pair in each set when there are two or more."""
    total = len(pairs)
    if total >= n_scoring + n_faith:
        return pairs[:n_scoring], pairs[n_scoring : n_scoring + n_faith]
    k = math.floor(total * n_scoring / (n_scoring + n_faith) + 0.5)
    if total >= 2:
        k = min(max(k, 1), total - 1)
    else:
        k = total  # one pair: scoring gets it, faithfulness has none
    return pairs[:k], pairs[k:]


def _draw_pair_sets(
    task, subroutine: str, cfg: PatchingConfig
) -> tuple[list[Pair], list[Pair], str | None, str | None]:
    """The scoring pairs (``cfg.score_split`` only) and the faithfulness pairs (``cfg.split``
    only) as drawn, disjoint, and why fewer than asked came of each (None: all did). When both
    come from one split and the scoring pairs exhaust it, no faithfulness pair is drawn
    (:func:`_shared_pair_sets` shares the scoring pairs)."""
    from subroutine_circuits.tasks.base import split_filter

    accept = split_filter(cfg.score_split, cfg.split_seed)
    scoring, why = _draw_pairs(task, subroutine, cfg.n_pairs, cfg.seed, accept=accept)
    if why is not None and _same_pool(cfg):  # the split is exhausted: no pair left to draw
        return scoring, [], why, None
    used = {t for c, x, _ in scoring for t in (c, x)}
    n_faith = cfg.n_faith_pairs or cfg.n_pairs
    accept = split_filter(cfg.split, cfg.split_seed)
    faith, why_faith = _draw_pairs(
        task, subroutine, n_faith, cfg.seed + 1_000_003, accept=accept, exclude=used
    )
    return scoring, faith, why, why_faith


def pair_sets(
    task, subroutine: str, cfg: PatchingConfig, warn: bool = True
) -> tuple[list[Pair], list[Pair]]:
    """The scoring pairs (from ``cfg.score_split``) and the faithfulness pairs (from
    ``cfg.split``) of one subroutine, disjoint (see the module docstring). Deterministic given
    ``cfg.seed``.

    When a split holds fewer pairs than asked, its set has the pairs found (possibly none);
    when both sets come from one split, the pairs found are shared between them in the asked
    ratio (:func:`_share`; one set or both may be empty). With ``warn``, a
    :class:`PairShortageWarning` gives found vs asked."""
    scoring, faith, notes = _shared_pair_sets(task, subroutine, cfg)
    if any(notes) and warn:
        n_faith = cfg.n_faith_pairs or cfg.n_pairs
        found = ((len(scoring), cfg.n_pairs), (len(faith), n_faith))
        why = "; ".join(dict.fromkeys(n for n in notes if n))
        splits = (cfg.score_split, cfg.split)
        message = _shortage_message(task.name, subroutine, splits, *found, why)
        warnings.warn(PairShortageWarning(message), stacklevel=2)
    return scoring, faith


def _shared_pair_sets(
    task, subroutine: str, cfg: PatchingConfig
) -> tuple[list[Pair], list[Pair], tuple[str, str]]:
    """:func:`pair_sets` without the warning: the two pair sets (shared by :func:`_share` when
    they come from one split and it holds fewer pairs than asked), and why each set has fewer
    pairs than asked ("" when it has them all)."""
    scoring, faith, why_s, why_f = _draw_pair_sets(task, subroutine, cfg)
    if not _same_pool(cfg):
        return scoring, faith, _set_notes(cfg, scoring, faith, why_s, why_f)
    why = why_s or why_f
    if why is None:
        return scoring, faith, ("", "")
    n_faith = cfg.n_faith_pairs or cfg.n_pairs
    note = _found_words(len(scoring) + len(faith), why)
    scoring, faith = _share(scoring + faith, cfg.n_pairs, n_faith)
    return scoring, faith, (note, note)


def _set_notes(
    cfg: PatchingConfig,
    scoring: Sequence,
    faith: Sequence,
    why_s: str | None,
    why_f: str | None,
) -> tuple[str, str]:
    """Why the scoring and the faithfulness draws, from two splits, gave fewer pairs than
    asked, each naming its set and split ("" for a set whose draw gave them all)."""

    def note(name: str, split: str | None, found: int, why: str | None) -> str:
        return (
            "" if why is None else f"{name} pairs {_split_words(split)}: {_found_words(found, why)}"
        )

    return (
        note("scoring", cfg.score_split, len(scoring), why_s),
        note("faithfulness", cfg.split, len(faith), why_f),
    )


def _found_words(found: int, why: str) -> str:
    """How many distinct minimal pairs the split gave and why no more, for messages."""
    return f"{found} distinct minimal pairs found: {why}" if found else f"none found: {why}"


def _shortage_message(
    task_name: str,
    subroutine: str,
    splits: tuple[str | None, str | None],
    scoring: tuple[int, int],
    faith: tuple[int, int],
    why: str,
) -> str:
    """The line saying that a subroutine has fewer minimal pairs than asked: found vs asked of
    each pair set (``(found, asked)``) and the split of each (``splits``: scoring,
    faithfulness), why, and what patching does about it."""
    (n_s, ask_s), (n_f, ask_f) = scoring, faith
    then = (
        f"patching of {subroutine!r} is skipped"
        if n_s == 0 or n_f == 0
        else "patching runs with the pairs found"
    )
    split_s, split_f = splits
    if split_s == split_f:
        counts = (
            f" {_split_words(split_s)}: {n_s} of {ask_s} scoring pairs, {n_f} of {ask_f} "
            f"faithfulness pairs"
        )
    else:
        counts = (
            f": {n_s} of {ask_s} scoring pairs {_split_words(split_s)}, {n_f} of {ask_f} "
            f"faithfulness pairs {_split_words(split_f)}"
        )
    return (
        f"task {task_name!r}: fewer minimal pairs for {subroutine!r} than asked"
        f"{counts} ({why}); {then}"
    )


def _oddness_metric(context_sum: Float[Tensor, "batch d"]):
    """Metric: oddness score of the (patched) stimulus among fixed, normalised contexts."""

    def metric(hidden: Tensor) -> Tensor:
        x = F.normalize(hidden.float(), dim=-1)
        return -(x * context_sum).sum(-1)

    return metric


def _label_metric(yes_id: int, no_id: int):
    def metric(logits: Tensor) -> Tensor:
        return logits[..., -1, yes_id] - logits[..., -1, no_id]

    return metric


@torch.no_grad()
def pair_data(model, tokenizer, pairs: Sequence[Pair], cfg: PatchingConfig) -> PairData:
    """Tokenise ``pairs``, group them by length and attach each group's metric.

    ``model`` is the model or its adapter. Pairs whose stimuli cannot be aligned are left out
    and listed in ``unaligned``; with no pair left the result has ``n_pairs == 0`` and no
    batches. Image tasks: see ``experiment.vision``."""
    adapter = _adapter(model, tokenizer, cfg.pool)
    model = adapter.model
    sampled = list(pairs)
    device = adapter.device
    by_len: dict[int, list[int]] = {}
    enc, pairs, unaligned = [], [], []
    for clean, corr, contexts in sampled:
        ids = pair_ids(tokenizer, clean, corr)
        if isinstance(ids, str):
            unaligned.append((clean, corr, ids))
            continue
        a, b = ids
        i = len(pairs)
        pairs.append((clean, corr, contexts))
        if len(a) > model.cfg.n_ctx:
            raise ValueError(f"stimulus of {len(a)} tokens exceeds the model's n_ctx")
        enc.append((a, b))
        by_len.setdefault(len(a), []).append(i)
    if not pairs:  # none given, or none aligned: nothing to patch (the caller skips it)
        return PairData([], "", 0, [], unaligned)
    batches = []
    if cfg.readout == "ooo":
        readout = {"last": "hidden_last", "mean": "hidden_mean"}[adapter.pool]
        for _, idx in sorted(by_len.items()):
            ctx_texts = [t for i in idx for t in pairs[i][2]]
            ctx = {k: v.to(device) for k, v in adapter.encode_stimuli(ctx_texts).items()}
            emb = adapter.embed(ctx)
            ctx_sum = F.normalize(emb.float(), dim=-1).view(len(idx), -1, emb.shape[-1]).sum(1)
            batches.append(_make_batch(enc, idx, device, _oddness_metric(ctx_sum)))
    else:
        readout = "logits"
        metric = _label_metric(tokenizer.yes_id, tokenizer.no_id)
        for _, idx in sorted(by_len.items()):
            batches.append(_make_batch(enc, idx, device, metric))
    return PairData(batches, readout, len(pairs), [(p[0], p[1]) for p in pairs], unaligned)


def pair_ids(tokenizer, clean: str, corr: str) -> tuple[list[int], list[int]] | str:
    """Token ids of a minimal pair aligned position by position, or why they cannot be.

    Tokenizers with ``align_pair`` (subword tokenizers, ``HFTaskTokenizer``) align at word
    boundaries: every word has the same number of tokens in both stimuli, so a unit patched at
    all positions moves each word's tokens together. Others must give equal token counts.
    """
    align = getattr(tokenizer, "align_pair", None)
    if align is not None:
        res = align(clean, corr)
        return (list(res.a.ids), list(res.b.ids)) if res.ok else res.reason
    a, b = tokenizer.encode(clean), tokenizer.encode(corr)
    if len(a) != len(b):
        return f"different token counts ({len(a)} vs {len(b)})"
    return list(a), list(b)


def build_pair_data(
    model, tokenizer, task, subroutine: str, cfg: PatchingConfig
) -> tuple[PairData, PairData]:
    """The scoring and the faithfulness :class:`PairData` of one subroutine (:func:`pair_sets`;
    ``split`` of each: the split its pairs come from).

    ``model`` is the model or its adapter. Image tasks draw their minimal scenes from the test
    stream with two seeds (``experiment.vision.image_pair_batch``). When the data hold fewer
    pairs than asked, each :class:`PairData` has the pairs found (``n_pairs`` < ``n_asked``,
    possibly 0, ``shortage`` says why) and a :class:`PairShortageWarning` names the subroutine,
    the splits and found vs asked."""
    n_faith = cfg.n_faith_pairs or cfg.n_pairs
    if getattr(task, "modality", "text") == "image":
        out = _image_pair_data(model, tokenizer, task, subroutine, cfg)
    elif getattr(tokenizer, "align_pair", None) is None:
        scoring, faith, notes = _shared_pair_sets(task, subroutine, cfg)
        out = [pair_data(model, tokenizer, pairs, cfg) for pairs in (scoring, faith)]
        splits = (cfg.score_split, cfg.split)
        for data, n, note, split in zip(out, (cfg.n_pairs, n_faith), notes, splits):
            data.n_asked, data.shortage, data.split = n, note, split
    else:
        out = _subword_pair_data(model, tokenizer, task, subroutine, cfg)
    scoring, faith = out
    if scoring.n_pairs < scoring.n_asked or faith.n_pairs < faith.n_asked:
        found = ((scoring.n_pairs, scoring.n_asked), (faith.n_pairs, faith.n_asked))
        why = _pair_notes(scoring, faith) or "fewer pairs than asked"
        splits = (scoring.split, faith.split)
        message = _shortage_message(task.name, subroutine, splits, *found, why)
        warnings.warn(PairShortageWarning(message), stacklevel=2)
    return scoring, faith


def _pair_notes(scoring: PairData, faith: PairData) -> str:
    """Why a subroutine has fewer minimal pairs than asked: the draws' ``shortage`` and the
    pairs of a short set left out because they could not be aligned ("" when none)."""
    notes = dict.fromkeys(d.shortage for d in (scoring, faith) if d.shortage)
    for name, data in (("scoring", scoring), ("faithfulness", faith)):
        if data.n_pairs < data.n_asked and data.unaligned:
            c, x, reason = data.unaligned[0]
            notes[
                f"{name} pairs not aligned token by token: {data.n_unaligned} "
                f"(e.g. {c!r} / {x!r}: {reason})"
            ] = None
    return "; ".join(notes)


def _image_pair_data(model, tokenizer, task, subroutine: str, cfg: PatchingConfig) -> list:
    """Scoring and faithfulness :class:`PairData` of an image task: minimal scenes of the shape
    world's ``cfg.score_split`` and ``cfg.split`` streams (independent seeded streams; None:
    :data:`IMAGE_PAIR_SPLIT`), with two seeds, ``cfg.n_pairs`` each (fewer when the world
    cannot build them)."""
    from subroutine_circuits.experiment.vision import image_pair_batch

    adapter = _adapter(model, tokenizer, cfg.pool)
    out = []
    for seed, split in ((cfg.seed, cfg.score_split), (cfg.seed + 1_000_003, cfg.split)):
        split = split or IMAGE_PAIR_SPLIT
        batch, why = image_pair_batch(
            adapter, task, subroutine, cfg, _oddness_metric, seed=seed, split=split
        )
        found = [batch] if batch is not None else []
        data = PairData(found, "embed", sum(b.n for b in found), split=split)
        data.n_asked, data.shortage = cfg.n_pairs, why or ""
        out.append(data)
    return out


def _subword_pair_data(model, tokenizer, task, subroutine: str, cfg: PatchingConfig) -> list:
    """Scoring and faithfulness :class:`PairData` for subword tokenizers: ALIGN_OVERSAMPLE
    times the pairs are drawn (still disjoint, each set from its split) and the first ``n``
    that align at word boundaries kept; the skipped ones are counted, not hidden. When both
    sets come from one split and it holds fewer pairs than the oversampled draw asked, every
    aligned pair found is shared (:func:`_share`)."""
    n_faith = cfg.n_faith_pairs or cfg.n_pairs
    wide = replace(
        cfg, n_pairs=cfg.n_pairs * ALIGN_OVERSAMPLE, n_faith_pairs=n_faith * ALIGN_OVERSAMPLE
    )
    scoring, faith, why_s, why_f = _draw_pair_sets(task, subroutine, wide)
    why = why_s or why_f
    if not _same_pool(cfg) or why is None:
        sets = [
            _first_aligned(tokenizer, scoring, cfg.n_pairs),
            _first_aligned(tokenizer, faith, n_faith),
        ]
        notes = _set_notes(cfg, scoring, faith, why_s, why_f)
    else:
        (kept_s, skip_s), (kept_f, skip_f) = (
            _first_aligned(tokenizer, pairs, len(pairs)) for pairs in (scoring, faith)
        )
        shared = _share(kept_s + kept_f, cfg.n_pairs, n_faith)
        sets = [(shared[0], skip_s), (shared[1], skip_f)]
        notes = (_found_words(len(scoring) + len(faith), why),) * 2
    out = []
    splits = (cfg.score_split, cfg.split)
    for (kept, skipped), n, note, split in zip(sets, (cfg.n_pairs, n_faith), notes, splits):
        data = pair_data(model, tokenizer, kept, cfg)
        data.unaligned = skipped + data.unaligned
        data.n_asked, data.split = n, split
        if data.n_pairs < n and note:
            data.shortage = note
        out.append(data)
    return out


#: Subword tokenizers: how many times the wanted number of minimal pairs is drawn, so that
#: enough of them align at word boundaries (``_first_aligned``).
ALIGN_OVERSAMPLE = 4


def _first_aligned(tokenizer, pairs: Sequence[Pair], n: int) -> tuple[list[Pair], list]:
    """The first ``n`` of ``pairs`` whose stimuli align token by token, and the skipped ones
    before them as ``(clean, corrupted, reason)`` (fewer than ``n``, or none, when fewer
    align)."""
    kept, skipped = [], []
    for clean, corr, contexts in pairs:
        if len(kept) == n:
            break
        ids = pair_ids(tokenizer, clean, corr)
        if isinstance(ids, str):
            skipped.append((clean, corr, ids))
        else:
            kept.append((clean, corr, contexts))
    return kept, skipped


def _make_batch(enc, idx, device, metric) -> PatchBatch:
    clean = torch.tensor([enc[i][0] for i in idx], dtype=torch.long, device=device)
    corr = torch.tensor([enc[i][1] for i in idx], dtype=torch.long, device=device)
    return PatchBatch(clean, corr, metric)


# ----------------------------------------------------------------------------- scores


def patching_scores(
    model, data: PairData, groups: Sequence[UnitGroup], method: str, cfg: PatchingConfig
) -> PatchScores:
    """Scores of one method over all length groups (merged, weighted by pair counts)."""
    parts = []
    for b in data.batches:
        args = (model, b.clean_tokens, b.corr_tokens, b.metric, groups)
        if method == "activation":
            parts.append(
                activation_patching(*args, readout=data.readout, chunk_rows=cfg.chunk_rows)
            )
        elif method == "attribution":
            parts.append(attribution_patching(*args, readout=data.readout))
        elif method == "integrated_gradients":
            parts.append(
                integrated_gradients(
                    *args, readout=data.readout, steps=cfg.ig_steps, chunk_rows=cfg.chunk_rows
                )
            )
        else:
            raise ValueError(f"unknown patching method {method!r}; choose from {METHODS}")
    return merge_scores(parts)


def mask_unit_params(mask) -> Tensor:
    """The mask's per-unit parameters in unit order (logits / log_alpha; fixed: 0/1)."""
    vals = []
    for part in mask.parts:
        for name in ("logits", "log_alpha", "values"):
            v = getattr(part, name, None)
            if isinstance(v, Tensor):
                vals.append(v.detach().float().flatten().cpu())
                break
        else:
            vals.append(part.binary().float().flatten().cpu())
    return torch.cat(vals)


def study_ablator(adapter, unit_map, ablation: str, reference=None, position_aware: bool = True):
    """The mask experiment's :class:`~subroutine_circuits.masks.ablator.Ablator` of
    ``ablation`` (``zero`` or ``mean``): ``reference`` is the mask experiment's reference set
    (training composite problems, a list of problems or their :class:`EncodedProblems`; mean
    values position-aware when ``position_aware``: readout positions get the mean over readout
    positions, other positions the mean over the other real positions) or the reference
    ablator already computed from it, used as it is. ValueError for mean ablation without a
    reference."""
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.masks.ablator import Ablator, reference_ablator

    if ablation == "zero":
        return Ablator("zero")
    if isinstance(reference, Ablator):
        if reference.kind != ablation:
            raise ValueError(
                f"the reference ablator is {reference.kind!r}, the cross-ablation {ablation!r}"
            )
        reference.check(unit_map)
        return reference
    if reference is None or len(reference) == 0:
        raise ValueError(
            "mean cross-ablation needs the mask experiment's reference problems (training "
            "composite problems); pass reference= to run_patching / cross_ablation"
        )
    enc = (
        reference if isinstance(reference, EncodedProblems) else adapter.encode_problems(reference)
    )
    return reference_ablator(
        adapter, unit_map, enc.to(adapter.device).flat_inputs(), ablation,
        position_aware=position_aware,
    )  # fmt: skip


def ablation_base(adapter, unit_map, ablation: str, reference=None, position_aware: bool = True):
    """A fixed all-ones :class:`~subroutine_circuits.masks.UnitMask` carrying the ablation
    values of :func:`study_ablator` (the mask experiment's). Masks derived with
    ``.fixed_like(keep)`` share these values."""
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.masks.ablator import apply_to_unit_mask

    base = UnitMask.fixed(unit_map, torch.ones(unit_map.n_units, dtype=torch.bool), ablation)
    ablator = study_ablator(adapter, unit_map, ablation, reference, position_aware)
    if ablation == "zero":
        return base
    return apply_to_unit_mask(base, ablator.to("cpu"))


def cross_ablation(
    model,
    tokenizer,
    unit_map,
    circuits: Tensor | Sequence[Tensor],
    test_problems: Mapping[str, list],
    subroutine: str,
    other: str,
    cfg: PatchingConfig,
    reference=None,
) -> list[dict[str, float]]:
    """Ablate each circuit and measure OOO accuracy on the target and other partitions, as the
    mask experiment does (a fixed unit mask keeping the complement, ablated with
    ``cfg.cross_ablation``; mean values from ``reference``, see :func:`ablation_base`). One
    dict per circuit with ``abl_target_acc``, ``abl_other_acc`` and ``abl_diff`` (clipped at
    chance)."""
    adapter = _adapter(model, tokenizer, cfg.pool)
    if isinstance(circuits, Tensor) and circuits.ndim == 1:
        circuits = [circuits]
    target_kind, other_kind = f"partition_{subroutine}", f"partition_{other}"
    for kind in (target_kind, other_kind):
        if not test_problems.get(kind):
            raise ValueError(f"test problems have no {kind!r} problems (needed for cross-ablation)")
    base = ablation_base(adapter, unit_map, cfg.cross_ablation, reference, cfg.position_aware)
    data = {
        kind: adapter.encode_problems(test_problems[kind]) for kind in (target_kind, other_kind)
    }
    results = []
    for circuit in circuits:
        fm = base.fixed_like(~circuit.bool().cpu())
        out = {}
        for name, kind in (("target", target_kind), ("other", other_kind)):
            out[f"abl_{name}_acc"] = adapter.accuracy(data[kind], fm, cfg.batch_size)
        out["abl_diff"] = clipped_diff(out["abl_target_acc"], out["abl_other_acc"], CHANCE)
        results.append(out)
    return results


def run_patching(
    model,
    tokenizer,
    task,
    subroutine: str,
    test_problems: Mapping[str, list] | None,
    mask=None,
    cfg: PatchingConfig | None = None,
    reference=None,
) -> list[dict[str, Any]]:
    """Patch, build circuits and compare with ``mask`` for one subroutine.

    Returns one dict per method with the ``cfg.meta`` items and ``subroutine, method,
    n_pairs`` (scoring pairs), ``n_faith_pairs``, ``score_split, faith_split`` (the split of
    each pair set: see the module docstring), ``n_units, clean_metric, corr_metric`` (on the
    scoring pairs), ``k`` (circuit size: see ``cfg.circuit_size``), ``f_k`` (its faithfulness),
    ``k_faithful, f_faithful`` (smallest circuit reaching ``cfg.faithfulness_target`` on the
    scoring pairs, its faithfulness on the faithfulness pairs), ``cpr, cmd`` (faithfulness
    pairs), with a mask ``mask_k`` and the pooled ``jaccard, spearman, roc_auc`` (reference
    only: per unit kind and layer with nulls in the score file's ``agreement`` table, see
    :func:`agreement_rows`), and ``abl_target_acc, abl_other_acc, abl_diff`` (the circuit
    ablated with ``cfg.cross_ablation``, means over ``reference``; NaN where not applicable:
    label readout or no partition problems). With ``cfg.out_dir`` the per-unit scores go to
    ``scores_[<meta values>_]<subroutine>_<method>.pt`` (key ``scores_file``).

    Thin data: ``n_pairs_asked`` / ``n_faith_pairs_asked`` are the pairs asked for, ``status``
    is ``ok``, ``fewer pairs`` (the data hold fewer minimal pairs: patching ran with those
    found, a :class:`PairShortageWarning` says so) or ``skipped`` (no scoring or no
    faithfulness pair: nothing is patched, every measure is NaN), and ``pairs_note`` says why.
    """
    return patching_and_frontier(
        model, tokenizer, task, subroutine, test_problems, mask, cfg, reference
    )[0]


def patching_and_frontier(
    model,
    tokenizer,
    task,
    subroutine: str,
    test_problems: Mapping[str, list] | None,
    mask=None,
    cfg: PatchingConfig | None = None,
    reference=None,
    families: Mapping[str, Tensor] | None = None,
    mask_ranking: Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`run_patching`'s rows and, with ``cfg.frontier``, the rows of ``frontier.csv``
    for the subroutine (:func:`frontier_of`; none when the subroutine is skipped for want of
    minimal pairs). ``families``: more frontier curves given as one circuit per frontier size
    (``patching.frontier.frontier``), e.g. the mask path; ``mask_ranking``: the mask's units
    most important first (kept, then dropped ones it adds), instead of the minimality pass's
    order stored with the mask."""
    from subroutine_circuits.patching.scores import resolve_groups

    cfg = cfg or PatchingConfig()
    adapter = _adapter(model, tokenizer, cfg.pool)
    if mask is not None and not hasattr(mask, "unit_map"):
        raise ValueError("patching compares with unit masks only (this mask has no unit_map)")
    unit_map = mask.unit_map if mask is not None else adapter.unit_map(kinds=cfg.kinds)
    groups = resolve_groups(adapter, unit_map)
    others = [p for p in task.predicates if p != subroutine]
    scoring, faith = build_pair_data(adapter, tokenizer, task, subroutine, cfg)
    if scoring.n_pairs == 0 or faith.n_pairs == 0:  # no pair to patch or to measure with
        n_units = sum(g.size for g in groups)
        return [
            _skipped_row(cfg, subroutine, method, scoring, faith, n_units, mask)
            for method in cfg.methods
        ], []
    adapter.model.eval()
    ctx = _PatchContext(
        adapter, tokenizer, subroutine, unit_map, groups, scoring, faith, mask, cfg, reference
    )
    rows = [
        _method_row(ctx, method, test_problems, others[0] if others else None)
        for method in cfg.methods
    ]
    if mask is not None:
        _save_circuit(ctx, "mask", mask.flat_binary().bool().cpu(), mask_unit_params(mask))
    if not cfg.frontier:
        return rows, []
    return rows, frontier_of(ctx, test_problems, families, mask_ranking)


@dataclass
class _PatchContext:
    """What every method of one :func:`run_patching` call shares."""

    adapter: Any
    tokenizer: Any
    subroutine: str
    unit_map: Any
    groups: list[UnitGroup]
    data: PairData  # scoring pairs (cfg.score_split): which units matter, which circuit
    faith: PairData  # faithfulness pairs (cfg.split, disjoint): how faithful the circuits are
    mask: Any
    cfg: PatchingConfig
    reference: Any = None  # the mask experiment's reference problems (mean ablation)
    scores: dict[str, Tensor] = field(default_factory=dict)  # per method, filled by _method_row

    @property
    def n_units(self) -> int:
        return sum(g.size for g in self.groups)


def _faithfulness(ctx: _PatchContext, scores: Tensor):
    """MIB faithfulness curve of the top-k circuits (faithfulness pairs) and the smallest
    faithful circuit (chosen on the scoring pairs, measured on the faithfulness pairs)."""
    cfg = ctx.cfg
    common = (cfg.curve_ablation, ctx.data.readout, cfg.use_abs, cfg.chunk_rows)
    curve = faithfulness_curve(
        ctx.adapter, ctx.faith.batches, ctx.groups, scores, cfg.fractions, *common
    )
    faithful, _ = smallest_faithful_circuit(
        ctx.adapter, ctx.data.batches, ctx.groups, scores, cfg.faithfulness_target, *common
    )
    return curve, faithful, _circuit_faithfulness(ctx, faithful)


def _circuit_of(ctx: _PatchContext, scores: Tensor, faithful: Tensor) -> Tensor:
    """The patching circuit compared with the mask (size: ``cfg.circuit_size``)."""
    cfg = ctx.cfg
    if isinstance(cfg.circuit_size, int):
        return top_k_circuit(scores, cfg.circuit_size, cfg.use_abs)
    if cfg.circuit_size == "mask" and ctx.mask is not None:
        return top_k_circuit(scores, int(ctx.mask.flat_binary().sum()), cfg.use_abs)
    return faithful


def _circuit_faithfulness(ctx: _PatchContext, circuit: Tensor) -> float:
    """``f(circuit)`` relative to the full and the fully ablated model, on the faithfulness
    pairs."""
    cfg, data = ctx.cfg, ctx.faith
    ends = torch.stack([circuit, torch.ones_like(circuit), torch.zeros_like(circuit)])
    m_k, m_full, m_empty = circuit_metrics(
        ctx.adapter, data.batches, ctx.groups, ends, cfg.curve_ablation, data.readout,
        cfg.chunk_rows,
    ).tolist()  # fmt: skip
    return (m_k - m_empty) / (m_full - m_empty) if m_full != m_empty else math.nan


def agreement_rows(
    scores: Float[Tensor, "n_units"],
    mask,
    unit_map,
    use_abs: bool = True,
    n_perm: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Mask-vs-patching agreement per unit kind and per (kind, layer), each with its null
    (:func:`subroutine_circuits.analysis.inference.agreement_table`: expected Jaccard of a
    random subset of the same size, permutation p for Spearman with the mask's per-unit
    parameters, Mann-Whitney p for ROC AUC, a forward-order baseline; a pooled row for
    reference). One dict per row."""
    from subroutine_circuits.analysis.inference import agreement_table

    units = unit_map.units()
    keep = mask.flat_binary().bool().cpu().numpy()
    table = agreement_table(
        keep,
        torch.as_tensor(scores).detach().float().cpu().numpy(),
        [u[0] for u in units],
        [u[1] for u in units],
        mask_params=mask_unit_params(mask).numpy(),
        use_abs=use_abs,
        n_perm=n_perm,
        seed=seed,
    )
    return table.to_dict("records")


def _mask_comparison(ctx: _PatchContext, scores: Tensor) -> dict[str, Any]:
    """Pooled Jaccard / Spearman / ROC AUC against the mask, and its size (empty without a
    mask); the per-kind agreement table is added by :func:`_method_row`."""
    if ctx.mask is None:
        return {}
    keep = ctx.mask.flat_binary().bool().cpu()
    cmp = compare_with_mask(scores, keep, mask_unit_params(ctx.mask), ctx.cfg.use_abs)
    return {**{k: v for k, v in cmp.items() if k != "k"}, "mask_k": int(keep.sum())}


def _cross_ablation(
    ctx: _PatchContext, scores: Tensor, circuit: Tensor, test_problems, other: str | None
) -> tuple[dict[str, float], dict[str, list] | None]:
    """The circuit ablated on the test partitions (NaN where not applicable) and the
    accuracy-vs-size curve of ablating the top-k units."""
    nan = {"abl_target_acc": math.nan, "abl_other_acc": math.nan, "abl_diff": math.nan}
    cfg = ctx.cfg
    if not (cfg.readout == "ooo" and test_problems and other):
        return nan, None
    ks = sorted({int(round(f * ctx.n_units)) for f in cfg.ablation_curve_fractions})
    circuits = [circuit] + [top_k_circuit(scores, k, cfg.use_abs) for k in ks]
    res = cross_ablation(
        ctx.adapter, ctx.tokenizer, ctx.unit_map, circuits, test_problems, ctx.subroutine, other,
        cfg, ctx.reference,
    )  # fmt: skip
    curve = {
        "k": ks,
        "target_acc": [r["abl_target_acc"] for r in res[1:]],
        "other_acc": [r["abl_other_acc"] for r in res[1:]],
    }
    return {**nan, **res[0]}, curve


def _file_stem(ctx: _PatchContext, name: str) -> str:
    """``[<meta values>_]<subroutine>_<name>``, file-name safe."""
    parts = [str(v) for v in ctx.cfg.meta.values()] + [ctx.subroutine, name]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))


def _save_circuit(ctx: _PatchContext, name: str, keep: Tensor, scores: Tensor) -> None:
    """Write one circuit as MIB / EAP-IG JSON into ``cfg.circuits_dir`` (nothing without
    one, or for units other than heads and neurons)."""
    from subroutine_circuits.patching.mib_format import save_circuit

    if ctx.cfg.circuits_dir is None:
        return
    if any(g.kind not in ("head", "neuron") for g in ctx.unit_map.groups):
        return
    model_cfg = getattr(ctx.adapter.model, "cfg", None)
    shape = {}
    if model_cfg is not None and hasattr(model_cfg, "n_layers"):
        shape = {"n_layers": int(model_cfg.n_layers), "n_heads": int(model_cfg.n_heads),
                 "d_model": int(model_cfg.d_model)}  # fmt: skip
    path = Path(ctx.cfg.circuits_dir) / f"{_file_stem(ctx, name)}.json"
    try:
        save_circuit(path, ctx.unit_map, keep, scores.detach().float().cpu(), **shape)
    except ValueError as e:  # a model the format cannot describe: the study goes on
        warnings.warn(f"circuit {path.name} not written: {e}", stacklevel=2)


def _save_scores(ctx: _PatchContext, method: str, res: PatchScores, extra: dict) -> str:
    """Write ``scores_<meta>_<subroutine>_<method>.pt`` into ``cfg.out_dir``; its file name."""
    from subroutine_circuits.utils import atomic_torch_save

    cfg = ctx.cfg
    path = Path(cfg.out_dir) / f"scores_{_file_stem(ctx, method)}.pt"
    atomic_torch_save(
        {
            **cfg.meta,
            "subroutine": ctx.subroutine,
            "method": method,
            "units": ctx.unit_map.units(),
            "hooks": [asdict(g) for g in ctx.groups],
            "normalised": res.normalised(),
            "pairs_scoring": list(ctx.data.texts),
            "pairs_faithfulness": list(ctx.faith.texts),
            **extra,
        },
        path,
    )
    return path.name


def _method_row(ctx: _PatchContext, method: str, test_problems, other: str | None) -> dict:
    """Scores of one method, its circuits and faithfulness, the comparison with the mask, the
    cross-ablation; the row of patching.csv (per-unit scores saved with ``cfg.out_dir``)."""
    cfg, data = ctx.cfg, ctx.data
    res = patching_scores(ctx.adapter, data, ctx.groups, method, cfg)
    scores = res.flat()
    ctx.scores[method] = scores
    curve, faithful, f_faithful = _faithfulness(ctx, scores)
    row: dict[str, Any] = {
        **_pair_columns(cfg, ctx.subroutine, method, data, ctx.faith),
        "n_units": ctx.n_units,
        "clean_metric": res.clean_metric,
        "corr_metric": res.corr_metric,
        "cpr": curve.cpr,
        "cmd": curve.cmd,
        "k_faithful": int(faithful.sum()),
        "f_faithful": f_faithful,
        "jaccard": math.nan,
        "spearman": math.nan,
        "roc_auc": math.nan,
        "cross_ablation": cfg.cross_ablation,
    }
    circuit = _circuit_of(ctx, scores, faithful)
    row["k"] = int(circuit.sum())
    _save_circuit(ctx, method, circuit, scores)
    row["f_k"] = _circuit_faithfulness(ctx, circuit)
    row.update(_mask_comparison(ctx, scores))
    abl, acc_curve = _cross_ablation(ctx, scores, circuit, test_problems, other)
    row.update(abl)
    if cfg.out_dir is not None:
        extra = {"scores": scores, "circuit": circuit, "curve": asdict(curve)}
        extra.update(faithfulness=acc_curve, row=dict(row))
        if ctx.mask is not None:
            extra["mask_keep"] = ctx.mask.flat_binary().bool().cpu()
            extra["agreement"] = agreement_rows(
                scores, ctx.mask, ctx.unit_map, cfg.use_abs, cfg.agreement_perms, cfg.seed
            )
        row["scores_file"] = _save_scores(ctx, method, res, extra)
    return row


#: The name of the chosen mask's point in frontier.csv.
CHOSEN_MASK = "chosen mask"


def frontier_of(
    ctx: _PatchContext,
    test_problems: Mapping[str, list] | None,
    families: Mapping[str, Tensor] | None = None,
    mask_ranking: Sequence[int] | None = None,
) -> list[dict]:
    """The frontier of one subroutine (rows of ``frontier.csv``, with ``cfg.meta`` and
    ``subroutine``): the mask's ranking (kept units first, in the minimality pass's order of
    importance when the mask has one, else by logit; then the rest) and its chosen mask as a
    point, each patching method's ranking by its scores (from the scoring pairs), and
    ``cfg.frontier_random`` random orders (averaged), measured on the faithfulness pairs
    (MIB's normalised faithfulness, ``cfg.curve_ablation``) and, for odd-one-out models with
    test ``sub_<subroutine>`` problems, the subroutine's accuracy with everything outside the
    circuit ablated as the mask experiment ablates (``accuracy``; NaN otherwise); and each of
    ``families`` (one circuit per frontier size, e.g. the mask path) as a curve."""
    cfg = ctx.cfg
    orders: dict[str, Tensor] = {}
    points: dict[str, Tensor] = {}
    if ctx.mask is not None:
        keep = ctx.mask.flat_binary().bool().cpu()
        importance = mask_importance(ctx.mask) if mask_ranking is None else list(mask_ranking)
        orders["mask"] = mask_order(keep, mask_unit_params(ctx.mask), importance)
        points[CHOSEN_MASK] = keep
    for method, scores in ctx.scores.items():
        orders[method] = score_order(scores, cfg.use_abs)
    if cfg.frontier_random:
        orders["random"] = random_orders(ctx.n_units, cfg.frontier_random, cfg.seed)
    res = frontier(
        ctx.adapter, ctx.faith.batches, ctx.groups, orders, cfg.frontier_fractions,
        cfg.curve_ablation, ctx.faith.readout, cfg.chunk_rows,
        accuracy=_subroutine_accuracy(ctx, test_problems), points=points, families=families,
    )  # fmt: skip
    meta = {**cfg.meta, "subroutine": ctx.subroutine}
    return [{**meta, **row} for row in frontier_rows(res)]


def pruned_info(mask) -> dict[str, Any]:
    """What the minimality pass recorded with a study mask (``search.prune_run``'s
    ``pruned``; empty for masks without it)."""
    meta = getattr(mask, "meta", None) or {}
    return (meta.get("training") or {}).get("pruned") or {}


def mask_importance(mask) -> list[int] | None:
    """The mask's own order of its units, most important first: the minimality pass's backward
    elimination (``search.elimination_order``, re-measured after every removal) reversed when
    the pass made the mask 1-minimal, else its last single-removal ranking (validation accuracy
    without each unit) reversed; None for masks without either (no pass, or a mask not from
    the study)."""
    pruned = pruned_info(mask)
    if pruned.get("elimination"):
        return list(reversed(pruned["elimination"]))
    ranking = pruned.get("ranking")
    return None if not ranking else list(reversed(ranking))


def _subroutine_accuracy(ctx: _PatchContext, test_problems: Mapping[str, list] | None):
    """The callable giving each circuit's accuracy on the test ``sub_<subroutine>`` problems
    (everything outside it ablated with the mask experiment's ablation and reference set), or
    None where that cannot be measured (label readout, no such problems, mean ablation
    without a reference set)."""
    from subroutine_circuits.experiment.evaluate import fixed_accuracies

    cfg = ctx.cfg
    kind = f"sub_{ctx.subroutine}"
    if cfg.readout != "ooo" or not test_problems or not test_problems.get(kind):
        return None
    try:
        ablator = study_ablator(
            ctx.adapter, ctx.unit_map, cfg.cross_ablation, ctx.reference, cfg.position_aware
        )
    except ValueError:  # mean ablation without the mask experiment's reference set
        return None
    data = ctx.adapter.encode_problems(test_problems[kind]).to(ctx.adapter.device)

    def accuracy(keeps: Tensor) -> list[float]:
        return fixed_accuracies(ctx.adapter, data, keeps, ctx.unit_map, ablator)

    return accuracy


def _pair_columns(
    cfg: PatchingConfig, subroutine: str, method: str, data: PairData, faith: PairData
) -> dict[str, Any]:
    """The first columns of a patching.csv row: which subroutine and method, and the minimal
    pairs found, asked for and not aligned, the split each pair set comes from
    (``score_split``, ``faith_split``; ``all``: no split), with the row's ``status`` and
    ``pairs_note``."""
    short = data.n_pairs < data.n_asked or faith.n_pairs < faith.n_asked
    if data.n_pairs == 0 or faith.n_pairs == 0:
        status = "skipped"
    else:
        status = "fewer pairs" if short else "ok"
    return {
        **cfg.meta,
        "subroutine": subroutine,
        "method": method,
        "n_pairs": data.n_pairs,
        "n_faith_pairs": faith.n_pairs,
        "n_unaligned": data.n_unaligned,
        "n_faith_unaligned": faith.n_unaligned,
        "n_pairs_asked": data.n_asked,
        "n_faith_pairs_asked": faith.n_asked,
        "score_split": _split_label(data.split),
        "faith_split": _split_label(faith.split),
        "status": status,
        "pairs_note": _pair_notes(data, faith),
    }


def _skipped_row(
    cfg: PatchingConfig,
    subroutine: str,
    method: str,
    data: PairData,
    faith: PairData,
    n_units: int,
    mask=None,
) -> dict[str, Any]:
    """The patching.csv row of a subroutine skipped for want of minimal pairs: the pair counts
    and why, every measure NaN, no score file (same columns as :func:`_method_row`)."""
    row = _pair_columns(cfg, subroutine, method, data, faith)
    row["n_units"] = n_units
    measures = ("clean_metric", "corr_metric", "cpr", "cmd", "k_faithful", "f_faithful")
    row.update(dict.fromkeys((*measures, "jaccard", "spearman", "roc_auc"), math.nan))
    row.update(cross_ablation=cfg.cross_ablation, k=math.nan, f_k=math.nan)
    if mask is not None:
        row["mask_k"] = int(mask.flat_binary().sum())
    row.update(abl_target_acc=math.nan, abl_other_acc=math.nan, abl_diff=math.nan)
    return row


def jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convert tensors / numpy scalars in result rows to plain Python values."""
    clean = []
    for r in rows:
        d = {}
        for k, v in r.items():
            if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
                v = v.item()
            elif hasattr(v, "tolist"):
                v = v.tolist()
            d[k] = v
        clean.append(d)
    return clean
