"""Planted models whose structure is known: modular, redundant, entangled and random-init.

``modular``: part A (``normalization_type=None``, see ``join``) is trained on ``sub_A`` problems
of a built-in task, part B on ``sub_B``; each part is pruned to the units it needs
(``prune.greedy_prune`` on its own task) and compacted; the two are joined side by side
(``join.join_models``) with a per-block scale fitted on composite *training* problems.

Ground truth of a modular model, stated precisely: for subroutine A (the task's first
predicate) the planted subnetwork is the set of block-A units of the joined model, i.e. the
units that ``prune.greedy_prune`` kept in part A on its own ``sub_A`` problems (validation plus
``prune_train_problems`` training problems): with every other unit of part A zero-ablated, part A
stays within ``prune_tol`` of its accuracy and ``prune_loss_tol`` nats of its cross-entropy
(up to the removals of the next rule), units whose removal costs less than
``prune_min_effect`` nats are dropped, and zero-ablating any kept unit on top raises the loss by
at least ``prune_min_effect`` (``PlantedModel.necessity`` has each unit's effect). Every other
unit (all of block B, plus, with ``compact=False``, A's pruned units, whose weights are zeroed;
with ``compact=True`` the zero-weight slots that pad a layer to the widest layer) is outside
A's subnetwork. The same holds for B. Because the join is exact, block A of the joined model
computes exactly what the pruned part A computed.

Which ablation defines the truth: pruning uses zero ablation, because pruned units are then
removed from the architecture (``compact``: their slots, if any, are exactly zero, so zero, mean
and any other ablation of them coincide). What the experiment does with the remaining units
depends on *its* ablation (mean by default), so after building, every planted unit's necessity
is re-measured with the experiment's ablation and with zero ablation, the rest of the model
outside its part ablated (``truth.truth_check``, stored in ``metrics["truth_check"]``): the truth
holds under an ablation when every planted unit still raises its subroutine's loss by at least
``prune_min_effect``. ``subroutine-circuits validate`` reports both.

``redundant`` (the issue's definition: two disjoint blocks compute the same subroutines, so no
single subnetwork is necessary and ablating the one a mask finds must not break its partition):
one small part (``redundant_part``: one layer, two heads, four neurons) is trained on ``sub_A``
and one on ``sub_B``, each is pruned and joined with an exact copy of itself (``A1 | A2``,
``B1 | B2``: same weights, disjoint units), and the two are joined with a block-A scale fitted so
that the composite training accuracy is as high as possible with either copy ablated. What is
planted, stated precisely and measured at build time (``truth.redundancy_check``, kept in
``metrics["redundancy_check"]``; a draw whose check fails under the study's ablation is
discarded and the parts are drawn again, up to ``redundant_tries`` times): every *minimal
sufficient subnetwork* of a subroutine -- a set of its units that alone reaches the mask
search's success threshold and in which the search's minimality pass can stop, found by
enumerating every subset of both copies -- can be ablated without lowering its partition by
more than ``redundant_max_drop`` (the verdict's margin), no single copy's ablation does either,
and each copy alone solves its subroutine. Expected verdict "not compositional": Break It Down
tests the minimal subnetwork that solves a subroutine, and here none is necessary.

Why this construction (changed after seeing verdicts on the previous one, see README): copies
add up at the readout, so a *mixture* of both copies can solve a subroutine and also be
necessary for it. In the previous construction (default-size parts, copies of 5-12 units,
pruned to a loss tolerance) many subsets of both copies were sufficient, e.g. 44 of 126
symmetric ones for one subject part, and the masks found such mixtures: ablating one broke the
partition, so those models did not meet the definition above, and 15 of 32 runs were called
compositional. With one-layer parts the subroutine has 2-4 units, every subset can be checked,
and only draws that meet the definition are kept. For scoring the masks' and patching's unit
rankings the truth is the union of both copies (a unit of either copy computes the subroutine).

``entangled`` (:mod:`entangled`): one part computes both subroutines in the same units, verified
exhaustively (every unit needed by both; no subset of units separates A from B by more than the
margin); expected verdict "not compositional".

``random_init``: a randomly initialised model of the joined architecture (dense, like any
random-init control); no truth, expected verdict "not compositional".
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from subroutine_circuits.groundtruth.join import BlockLayout, join_models, joined_spec, layout_of
from subroutine_circuits.groundtruth.prune import (
    Encoded,
    Unit,
    all_units,
    compact_part,
    evaluate_ablations,
    greedy_prune,
)

KINDS = ("modular", "redundant", "entangled", "random_init")
#: The part sizes ``PlantedConfig.redundant_part`` may override.
_PART_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp")
#: The verdict each kind should get under Break It Down (see the module docstring).
EXPECTED = {
    "modular": "compositional",
    "redundant": "not compositional",
    "entangled": "not compositional",
    "random_init": "not compositional",
}


@dataclass
class PlantedConfig:
    """How planted models are built (defaults: parts train and prune in seconds on one core).

    Args:
        task: a built-in task name (two predicates, A then B).
        n_train: training OOO problems per kind (val and test get a quarter each).
        data_seed: seed of the problem splits (``None``: the planted model's seed).
        n_layers, d_model, n_heads, d_head, d_mlp: each part's size before pruning.
        n_ctx, attention, pool: as in ``models.ModelSpec``.
        train: ``models.TrainConfig`` overrides for the parts.
        prune: prune the parts to the units they need (else every unit is planted).
        prune_tol, prune_loss_tol: the pruning tolerances (accuracy, mean cross-entropy).
        prune_min_effect: the smallest loss increase (nats) of a planted unit's ablation.
        prune_train_problems: training problems added to the validation problems for pruning.
        compact: drop pruned units from the architecture (else zero their weights).
        redundant_part: ``part_spec`` overrides of a redundant model's parts (default: one
            layer of two heads and four neurons, so that each subroutine has few enough units
            for ``truth.redundancy_check`` to enumerate every subset of them).
        fit_scale: fit the block-A scale of the join on composite training problems.
        scale_grid: multipliers of the norm-equalising scale tried by the fit.
        fit_problems: composite training problems used by the fit (and the mean-ablation
            reference of the truth checks).
        ablation: the experiment's ablation (``"mean"`` or ``"zero"``) the truth is checked with.
        redundant_max_drop: the largest drop of a validation partition's accuracy when one copy,
            or one minimal sufficient subnetwork, of a redundant model is ablated
            (``truth.redundancy_check``; default: the verdict's margin, so that removing
            whichever minimal subnetwork a mask found cannot break its partition).
        sufficient_acc: the accuracy on ``sub_<p>`` at which a subnetwork counts as solving
            ``p`` (the study's mask success threshold; ``validate`` sets it from the study).
        minimal_tol: the tolerance of the mask search's minimality pass (``validate`` sets it
            from the study's ``mask.tolerance``): ``redundancy_check`` uses it to find the
            subnetworks that pass can stop in (``truth.minimal_subnetworks``).
        redundant_max_units: the most units of one subroutine ``redundancy_check`` enumerates.
        redundant_tries: draws of a redundant model's parts before giving up (a draw is kept
            when its ``redundancy_check`` holds under ``ablation``).
        entangled_steps, entangled_lr, entangled_drop, entangled_weight: the anti-selectivity
            fine-tuning of entangled models (``entangled`` module).
        entangled_tries: draws of an entangled part before giving up.
        entangled_margin: largest selectivity of any unit subset of an entangled model.
        entangled_max_units: largest entangled model (its ``2**n`` subsets are checked).
    """

    task: str = "agreement_singular"
    n_train: int = 400
    data_seed: int | None = None
    n_layers: int = 2
    d_model: int = 32
    n_heads: int = 4
    d_head: int = 8
    d_mlp: int = 16
    n_ctx: int = 32
    attention: str = "causal"
    pool: str = "last"
    train: dict[str, Any] = field(default_factory=dict)
    prune: bool = True
    prune_tol: float = 0.01
    prune_loss_tol: float = 0.05
    prune_min_effect: float = 0.01
    prune_train_problems: int = 200
    compact: bool = True
    fit_scale: bool = True
    scale_grid: tuple[float, ...] = (0.5, 0.71, 1.0, 1.41, 2.0)
    fit_problems: int = 200
    ablation: str = "mean"
    redundant_max_drop: float = 0.05
    redundant_part: dict[str, int] = field(
        default_factory=lambda: {"n_layers": 1, "n_heads": 2, "d_mlp": 4}
    )
    sufficient_acc: float = 0.9
    minimal_tol: float = 0.02
    redundant_max_units: int = 10
    redundant_tries: int = 10
    entangled_steps: int = 300
    entangled_lr: float = 1e-3
    entangled_drop: float = 0.5
    entangled_weight: float = 1.0
    entangled_tries: int = 3
    entangled_margin: float = 0.05
    entangled_max_units: int = 10

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("n_train", "n_layers", "d_model", "n_heads", "d_head", "d_mlp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PlantedConfig.{name} must be an int >= 1, got {v!r}")
        if not 0 <= self.prune_tol < 1:
            raise ValueError(f"PlantedConfig.prune_tol must be in [0, 1), got {self.prune_tol}")
        if self.prune_loss_tol < 0:
            raise ValueError(
                f"PlantedConfig.prune_loss_tol must be >= 0, got {self.prune_loss_tol}"
            )
        if not 0 <= self.redundant_max_drop < 1:
            raise ValueError(
                f"PlantedConfig.redundant_max_drop must be in [0, 1), got {self.redundant_max_drop}"
            )
        if self.ablation not in ("mean", "zero"):
            raise ValueError(
                f"PlantedConfig.ablation must be 'mean' or 'zero', got {self.ablation!r}"
            )
        bad = set(self.redundant_part) - set(_PART_FIELDS)
        if bad:
            raise ValueError(
                f"PlantedConfig.redundant_part: unknown field(s) {sorted(bad)}; "
                f"choose from {list(_PART_FIELDS)}"
            )
        for name, v in self.redundant_part.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PlantedConfig.redundant_part[{name!r}] must be an int >= 1")
        if not 0 <= self.minimal_tol < 1:
            raise ValueError(f"PlantedConfig.minimal_tol must be in [0, 1), got {self.minimal_tol}")
        if not 0 < self.sufficient_acc <= 1:
            raise ValueError(
                f"PlantedConfig.sufficient_acc must be in (0, 1], got {self.sufficient_acc}"
            )
        for name in (
            "entangled_steps", "entangled_tries", "entangled_max_units", "redundant_max_units",
            "redundant_tries",
        ):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PlantedConfig.{name} must be an int >= 1, got {v!r}")
        if not 0 <= self.entangled_drop < 1:
            raise ValueError(
                f"PlantedConfig.entangled_drop must be in [0, 1), got {self.entangled_drop}"
            )
        if not self.scale_grid or any(not g > 0 for g in self.scale_grid):
            raise ValueError(f"PlantedConfig.scale_grid must be positive, got {self.scale_grid}")

    def part_spec(self, **overrides: int):
        """The ``ModelSpec`` of one part (``normalization_type=None``: see ``join``);
        ``overrides``: other values of :data:`_PART_FIELDS`."""
        from subroutine_circuits.models import ModelSpec

        sizes = {name: getattr(self, name) for name in _PART_FIELDS}
        return ModelSpec(
            "tiny",
            attention=self.attention,
            n_ctx=self.n_ctx,
            pool=self.pool,
            normalization_type=None,
            **{**sizes, **overrides},
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = asdict(self)
        d["scale_grid"] = list(self.scale_grid)
        return d


@dataclass
class PlantedModel:
    """A planted model and what is known about it.

    ``truth[predicate]``: the planted units ``(layer, kind, index)`` of that subroutine (``None``
    for kinds without a unit-level truth). ``metrics``: validation accuracies of the parts and the
    joined model (see :func:`describe`). ``necessity[unit]``: ``(accuracy drop, loss
    increase)`` of ablating that planted unit on top of its part's pruned units. ``splits``:
    the problems it was built from (an experiment on it should use the same ``data_seed`` so
    that no test text was trained on).
    """

    kind: str
    seed: int
    model: Any
    task: Any
    tokenizer: Any
    splits: dict[str, dict[str, list[Any]]]
    truth: dict[str, frozenset[Unit]] | None
    layout: BlockLayout | None = None
    scale_a: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    necessity: dict[Unit, tuple[float, float]] = field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def expected(self) -> str:
        """The verdict this kind of model should get (:data:`EXPECTED`)."""
        return EXPECTED[self.kind]

    @property
    def subroutines(self) -> tuple[str, ...]:
        """The task's predicates (A, B)."""
        return tuple(self.task.predicates)

    def truth_vector(self, subroutine: str, units: Any = None) -> Bool[Tensor, " n_units"]:
        """Planted units of ``subroutine`` as a boolean vector aligned with ``units``.

        ``units``: a ``masks.UnitMap`` (anything with ``.units()``), a list of ``(layer, kind,
        index)``, or ``None`` for every head and neuron in ``tl_unit_map`` order.
        Raises ``ValueError`` for a model kind without a truth or an unknown subroutine.
        """
        if self.truth is None:
            raise ValueError(f"a {self.kind!r} planted model has no unit-level ground truth")
        if subroutine not in self.truth:
            raise ValueError(
                f"unknown subroutine {subroutine!r}; planted ones: {sorted(self.truth)}"
            )
        return truth_vector(self.truth[subroutine], units if units is not None else self.units())

    def units(self) -> list[Unit]:
        """Every head and neuron of the model, in ``tl_unit_map`` order."""
        return all_units(self.model)

    def summary(self) -> dict[str, Any]:
        """JSON-able description (no weights)."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "task": self.task.name,
            "n_units": len(self.units()),
            "truth_sizes": None
            if self.truth is None
            else {k: len(v) for k, v in self.truth.items()},
            "layout": None if self.layout is None else self.layout.to_dict(),
            "parts": {
                k: {"n_units": len(v["units"]), "computes": list(v["computes"])}
                for k, v in self.parts.items()
            },  # fmt: skip
            "scale_a": self.scale_a,
            "metrics": self.metrics,
            "seconds": self.seconds,
        }


def truth_vector(truth: frozenset[Unit] | set[Unit], units: Any) -> Bool[Tensor, " n_units"]:
    """``truth`` as a boolean vector over ``units`` (a ``UnitMap`` or a list of units)."""
    if hasattr(units, "units"):
        units = units.units()
    return torch.tensor([tuple(u) in truth for u in units], dtype=torch.bool)


# ----------------------------------------------------------------------------------- building
def _data(cfg: PlantedConfig, seed: int, splits: dict | None):
    from subroutine_circuits.tasks import get_task, make_splits

    task = get_task(cfg.task)
    if len(task.predicates) != 2:
        raise ValueError(f"task {cfg.task!r} must have exactly two predicates (A, B)")
    if splits is None:
        data_seed = seed if cfg.data_seed is None else cfg.data_seed
        splits = make_splits(task, cfg.n_train, seed=data_seed)
    for kind in ("composite", *(f"sub_{p}" for p in task.predicates)):
        for split in ("train", "val"):
            if not splits.get(split, {}).get(kind):
                raise ValueError(f"splits[{split!r}] has no {kind!r} problems")
    return task, task.tokenizer(), splits


def _mix(splits: dict, split: str, kinds: Sequence[str], n: int | None = None) -> list[Any]:
    """The problems of several kinds, interleaved (the first ``n`` of each kind if given)."""
    lists = [splits[split][k][:n] if n is not None else splits[split][k] for k in kinds]
    out = []
    for i in range(max(len(x) for x in lists)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def _train_part(
    cfg, kinds: Sequence[str], seed: int, tokenizer, splits, spec: Any = None
) -> tuple[Any, dict[str, Any]]:
    """Train, prune and compact one part (``spec``, default ``cfg.part_spec()``) on problems
    of ``kinds``; returns (part, info)."""
    from subroutine_circuits.models import TrainConfig, make_model, train_ooo

    kinds = list(kinds)
    kind = "+".join(kinds)
    t0 = time.perf_counter()
    spec = cfg.part_spec() if spec is None else spec
    part = make_model(spec, vocab_size=tokenizer.vocab_size, seed=seed)
    tcfg = TrainConfig(**{"progress": False, "seed": seed, **cfg.train})
    res = train_ooo(part, _mix(splits, "train", kinds), _mix(splits, "val", kinds), tokenizer, tcfg)
    info: dict[str, Any] = {
        "kind": kind,
        "seed": seed,
        "val_acc": res.best_val_acc,
        "train_seconds": res.seconds,
        "n_units": len(all_units(part)),
    }
    kept = set(all_units(part))
    necessity: dict[Unit, tuple[float, float]] = {}
    if cfg.prune:
        n_train = cfg.prune_train_problems // len(kinds)
        pool = _mix(splits, "val", kinds) + _mix(splits, "train", kinds, n_train)
        pr = greedy_prune(
            part,
            Encoded.of(pool, tokenizer),
            tol=cfg.prune_tol,
            loss_tol=cfg.prune_loss_tol,
            min_effect=cfg.prune_min_effect,
        )
        kept = pr.kept
        necessity = {u: (pr.necessity[u], pr.loss_necessity[u]) for u in kept}
        info.update(
            prune_base_acc=pr.base_acc,
            prune_acc=pr.pruned_acc,
            prune_base_loss=pr.base_loss,
            prune_loss=pr.pruned_loss,
            min_acc_necessity=pr.min_necessity,
            min_loss_necessity=min(pr.loss_necessity.values(), default=float("nan")),
            prune_evaluations=pr.evaluations,
        )
    part, kept, mapping = compact_part(part, kept, keep_width=not cfg.compact)
    info["n_kept"] = len(kept)
    info["necessity"] = {mapping[u]: v for u, v in necessity.items()}
    val = Encoded.of(_mix(splits, "val", kinds), tokenizer)
    (info["val_acc_pruned"],), _ = evaluate_ablations(part, val, [set()])
    info["seconds"] = time.perf_counter() - t0
    return part, {"kept": kept, **info}


@torch.no_grad()
def _fit_scale(
    part_a, part_b, cfg, tokenizer, splits, copies: Sequence[frozenset[Unit]] | None = None
) -> tuple[float, dict[str, Any]]:
    """Block-A scale: equalise the blocks' mean final-embedding norms, then pick the grid
    multiplier with the best composite *training* accuracy (ties: the one nearest 1).

    ``copies`` (redundant models: the joined model's units of each copy): the accuracy of a
    multiplier is the worst of the whole model's and of the model with any one copy ablated
    (``cfg.ablation``), so that each copy alone carries the task as well as the scale allows.
    """
    from subroutine_circuits.groundtruth.truth import AblationEvaluator
    from subroutine_circuits.models import final_hidden

    problems = splits["train"]["composite"][: cfg.fit_problems]
    data = Encoded.of(problems, tokenizer)
    b, k, pos = data.tokens.shape
    joined = join_models(part_a, part_b)
    lay = layout_of(part_a, part_b)
    emb = final_hidden(joined, data.tokens.view(b * k, pos), data.lengths.view(b * k))
    norm_a = float(emb[:, lay.resid("A")].norm(dim=-1).mean())
    norm_b = float(emb[:, lay.resid("B")].norm(dim=-1).mean())
    base = norm_b / max(norm_a, 1e-12)
    if not cfg.fit_scale:
        return 1.0, {"norm_a": norm_a, "norm_b": norm_b}
    results = []
    for g in cfg.scale_grid:
        model = join_models(part_a, part_b, scale_a=base * g)
        if copies is None:
            (acc,), _ = evaluate_ablations(model, data, [set()])
        else:
            ev = AblationEvaluator(model, tokenizer, cfg.ablation, problems)
            acc = min(ev.evaluate(problems, [set(), *copies])[0])
        results.append((acc, -abs(math.log(g)), g))
    acc, _, g = max(results)
    return base * g, {"norm_a": norm_a, "norm_b": norm_b, "fit_acc": acc, "grid_factor": g}


@torch.no_grad()
def describe(
    model: Any, task: Any, tokenizer: Any, splits: dict, layout: BlockLayout | None = None
) -> dict[str, Any]:
    """Validation accuracies of a joined model: every problem kind, with nothing ablated, with
    every unit ablated (the bypass check: must be near chance) and, given a ``layout``, with one
    block's units ablated (``onlyA_*`` keeps block A only)."""
    units = all_units(model)
    configs: dict[str, set[Unit]] = {"full": set(), "none": set(units)}
    if layout is not None:
        configs["onlyA"] = layout.units("B") & set(units)
        configs["onlyB"] = layout.units("A") & set(units)
    kinds = ["composite", *(f"sub_{p}" for p in task.predicates)]
    kinds += [f"partition_{p}" for p in task.predicates]
    out: dict[str, Any] = {}
    for kind in kinds:
        problems = splits["val"].get(kind)
        if not problems:
            continue
        accs, _ = evaluate_ablations(model, Encoded.of(problems, tokenizer), list(configs.values()))
        for name, acc in zip(configs, accs):
            out[f"{name}_{kind}"] = acc
    return out


def build_modular(
    seed: int, cfg: PlantedConfig | None = None, splits: dict | None = None
) -> PlantedModel:
    """A modular planted model: block A trained on ``sub_A``, block B on ``sub_B``."""
    return _build_joined("modular", seed, cfg, splits)


class RedundantBuildError(ValueError):
    """No draw of a redundant model's parts passed ``truth.redundancy_check``."""


def build_redundant(
    seed: int, cfg: PlantedConfig | None = None, splits: dict | None = None
) -> PlantedModel:
    """A redundant planted model: two copies of A (and two of B) in disjoint units, kept only
    when ``truth.redundancy_check`` holds under ``cfg.ablation`` (``cfg.redundant_tries``
    draws of the parts; ``metrics["attempts"]`` lists them). Raises ``RedundantBuildError``
    when none holds."""
    from subroutine_circuits.groundtruth.truth import redundancy_check

    cfg = cfg if cfg is not None else PlantedConfig()
    cfg.validate()
    t0 = time.perf_counter()
    _, _, splits = _data(cfg, seed, splits)  # once, not once per draw
    attempts = []
    for attempt in range(cfg.redundant_tries):
        planted = _build_joined("redundant", seed, cfg, splits, attempt)
        check = redundancy_check(planted, cfg)
        attempts.append({"attempt": attempt, "ok": {k: v["ok"] for k, v in check.items()}})
        if check[cfg.ablation]["ok"]:
            planted.metrics.update(redundancy_check=check, attempts=attempts)
            planted.seconds = time.perf_counter() - t0
            return planted
        attempts[-1]["check"] = check
    raise RedundantBuildError(
        f"redundant model for seed {seed}: none of {cfg.redundant_tries} draws passed the "
        f"redundancy check under {cfg.ablation!r} ablation ({attempts})"
    )


def _part_units(kept: set[Unit], *steps: tuple[BlockLayout, str]) -> frozenset[Unit]:
    """A part's kept units mapped through nested joins (``(layout, block)`` innermost first)."""
    out = set(kept)
    for lay, block in steps:
        out = {_to_joined(u, lay, block) for u in out}
    return frozenset(out)


def _build_joined(
    kind: str, seed: int, cfg: PlantedConfig | None, splits, attempt: int = 0
) -> PlantedModel:
    cfg = cfg if cfg is not None else PlantedConfig()
    cfg.validate()
    t0 = time.perf_counter()
    task, tok, splits = _data(cfg, seed, splits)
    pa, pb = task.predicates
    if kind == "modular":
        part_a, info_a = _train_part(cfg, [f"sub_{pa}"], 1000 * seed + 1, tok, splits)
        part_b, info_b = _train_part(cfg, [f"sub_{pb}"], 1000 * seed + 2, tok, splits)
        steps: dict[str, tuple] = {"A": (info_a, ()), "B": (info_b, ())}
        computes = {"A": (pa,), "B": (pb,)}
    else:  # one part per subroutine, each joined with an exact copy of itself
        spec, s0 = cfg.part_spec(**cfg.redundant_part), 1000 * seed + 501 + 10 * attempt
        one_a, info_a = _train_part(cfg, [f"sub_{pa}"], s0, tok, splits, spec)
        one_b, info_b = _train_part(cfg, [f"sub_{pb}"], s0 + 2, tok, splits, spec)
        part_a, part_b = join_models(one_a, one_a), join_models(one_b, one_b)
        lay_a, lay_b = layout_of(one_a, one_a), layout_of(one_b, one_b)
        steps = {
            "A1": (info_a, ((lay_a, "A"),)),
            "A2": (copy.deepcopy(info_a), ((lay_a, "B"),)),
            "B1": (info_b, ((lay_b, "A"),)),
            "B2": (copy.deepcopy(info_b), ((lay_b, "B"),)),
        }
        computes = {"A1": (pa,), "A2": (pa,), "B1": (pb,), "B2": (pb,)}
    lay = layout_of(part_a, part_b)
    paths = {name: (*inner, (lay, name[0])) for name, (_, inner) in steps.items()}
    copies = None
    if kind == "redundant":
        copies = [_part_units(info["kept"], *paths[n]) for n, (info, _) in steps.items()]
    scale, fit = _fit_scale(part_a, part_b, cfg, tok, splits, copies)
    model = join_models(part_a, part_b, scale_a=scale)
    parts: dict[str, dict[str, Any]] = {}
    necessity: dict[Unit, tuple[float, float]] = {}
    metrics: dict[str, Any] = {"scale_fit": fit}
    for name, (info, _) in steps.items():
        path = paths[name]
        units = _part_units(info.pop("kept"), *path)
        necessity.update({next(iter(_part_units({u}, *path))): v
                          for u, v in info.pop("necessity").items()})  # fmt: skip
        parts[name] = {"units": units, "computes": computes[name]}
        metrics[f"part_{name}"] = info
    truth = {
        p: frozenset().union(*(v["units"] for v in parts.values() if p in v["computes"]))
        for p in (pa, pb)
    }
    metrics["joined"] = describe(model, task, tok, splits, lay)
    return PlantedModel(
        kind, seed, model, task, tok, splits, truth, lay, scale, metrics,
        time.perf_counter() - t0, necessity, parts,
    )  # fmt: skip


def _to_joined(unit: Unit, layout: BlockLayout, block: str) -> Unit:
    layer, kind, idx = unit
    if block == "A":
        return (layer, kind, idx)
    return (layer, kind, idx + (layout.n_heads_a if kind == "head" else layout.d_mlp_a))


def build_random(
    seed: int,
    cfg: PlantedConfig | None = None,
    splits: dict | None = None,
    like: Any = None,
) -> PlantedModel:
    """A random-init model of the joined architecture (of ``like``, a joined model, if given;
    else of two unpruned parts of ``cfg``)."""
    from subroutine_circuits.models import ModelSpec, make_model

    cfg = cfg if cfg is not None else PlantedConfig()
    cfg.validate()
    t0 = time.perf_counter()
    task, tok, splits = _data(cfg, seed, splits)
    if like is None:
        part = make_model(cfg.part_spec(), vocab_size=tok.vocab_size, seed=0)
        spec = joined_spec(part, part)
    else:
        from subroutine_circuits.models.presets import POOL_ATTR

        c = like.cfg
        spec = ModelSpec(
            "tiny", attention=c.attention_dir, n_ctx=int(c.n_ctx),
            pool=getattr(like, POOL_ATTR, "last"), n_layers=int(c.n_layers),
            d_model=int(c.d_model), n_heads=int(c.n_heads), d_head=int(c.d_head),
            d_mlp=int(c.d_mlp), act_fn=c.act_fn, normalization_type=c.normalization_type,
        )  # fmt: skip
    model = make_model(spec, vocab_size=tok.vocab_size, seed=1000 * seed + 999)
    metrics = {"joined": describe(model, task, tok, splits)}
    return PlantedModel(
        "random_init", seed, model, task, tok, splits, None, None, 1.0, metrics,
        time.perf_counter() - t0,
    )  # fmt: skip


def build_entangled(seed: int, cfg: Any = None, splits: dict | None = None):
    """An entangled planted model (``groundtruth.entangled``); raises ``EntangledBuildError``
    when none of ``cfg.entangled_tries`` draws passes the check."""
    from subroutine_circuits.groundtruth.entangled import (
        EntangledBuildError,
        disentangle_penalty_finetune,
        entanglement_check,
    )

    cfg = cfg if cfg is not None else PlantedConfig()
    cfg.validate()
    t0 = time.perf_counter()
    task, tok, splits = _data(cfg, seed, splits)
    preds = tuple(task.predicates)
    kinds = ["composite", *(f"sub_{p}" for p in preds)]
    attempts = []
    for attempt in range(cfg.entangled_tries):
        part_seed = 1000 * seed + 700 + attempt
        part, info = _train_part(cfg, kinds, part_seed, tok, splits)
        live = frozenset(info.pop("kept"))
        info.pop("necessity")
        info["finetune"] = disentangle_penalty_finetune(
            part, tok, splits, preds, cfg, part_seed, live
        )
        checks = {}
        for a in dict.fromkeys((cfg.ablation, "zero")):
            checks[a] = entanglement_check(part, tok, splits, preds, cfg, a, live)
            if not checks[a]["passed"]:
                break
        attempts.append({"seed": part_seed, "part": info, "checks": checks})
        if all(c["passed"] for c in checks.values()):
            units = live
            metrics = {"attempts": attempts, "joined": describe(part, task, tok, splits)}
            return PlantedModel(
                "entangled", seed, part, task, tok, splits, {p: units for p in preds}, None,
                1.0, metrics, time.perf_counter() - t0, {},
                {"E": {"units": units, "computes": preds}},
            )  # fmt: skip
    raise EntangledBuildError(
        f"entangled model for seed {seed}: none of {cfg.entangled_tries} draws passed the "
        f"entanglement check ({[a['checks'] for a in attempts]})"
    )


def build_planted(
    kind: str, seed: int, cfg: PlantedConfig | None = None, splits: dict | None = None
) -> PlantedModel:
    """Build a planted model of ``kind`` (one of :data:`KINDS`)."""
    if kind == "modular":
        return build_modular(seed, cfg, splits)
    if kind == "redundant":
        return build_redundant(seed, cfg, splits)
    if kind == "random_init":
        return build_random(seed, cfg, splits)
    if kind == "entangled":
        return build_entangled(seed, cfg, splits)
    raise ValueError(f"unknown planted model kind {kind!r}; choose one of {list(KINDS)}")


def block_units(planted: PlantedModel, block: str) -> Sequence[Unit]:
    """The units of ``block`` (``"A"``/``"B"``) of a joined planted model, sorted."""
    if planted.layout is None:
        raise ValueError(f"a {planted.kind!r} planted model has no blocks")
    return sorted(planted.layout.units(block))


# ----------------------------------------------------------------------------------- caching
def _units_json(units: Any) -> list[list[Any]]:
    return [list(u) for u in sorted(units)]


def _units_from(rows: Any) -> frozenset[Unit]:
    return frozenset((int(a), str(b), int(c)) for a, b, c in rows)


def save_planted(planted: PlantedModel, directory: Any, config: dict | None = None) -> None:
    """Write ``planted`` (weights, vocabulary, truth, parts, metrics) as a checkpoint folder.

    ``config``: the build settings, stored so that :func:`load_planted` can refuse a cache
    built with other settings."""
    from subroutine_circuits.models import save_checkpoint

    info = {
        "kind": planted.kind,
        "seed": planted.seed,
        "task": planted.task.name,
        "truth": None if planted.truth is None
        else {k: _units_json(v) for k, v in planted.truth.items()},
        "parts": {k: {"units": _units_json(v["units"]), "computes": list(v["computes"])}
                  for k, v in planted.parts.items()},
        "layout": None if planted.layout is None else planted.layout.to_dict(),
        "scale_a": planted.scale_a,
        "metrics": _jsonable(planted.metrics),
        "seconds": planted.seconds,
        "necessity": [[*u, *v] for u, v in sorted(planted.necessity.items())],
        "config": config,
    }  # fmt: skip
    save_checkpoint(directory, planted.model, planted.tokenizer, {"planted": info})


def load_planted(directory: Any, task: Any, splits: dict, config: dict | None = None):
    """The :class:`PlantedModel` saved by :func:`save_planted` (``None`` if there is none or it
    was built with another ``config``)."""
    from pathlib import Path

    from subroutine_circuits.models import load_checkpoint

    if not (Path(directory) / "meta.json").is_file():
        return None
    model, tok, meta = load_checkpoint(directory)
    info = meta.get("planted")
    if info is None or info.get("config") != _jsonable(config) or info["task"] != task.name:
        return None
    truth = info["truth"]
    return PlantedModel(
        info["kind"], int(info["seed"]), model, task, tok, splits,
        None if truth is None else {k: _units_from(v) for k, v in truth.items()},
        None if info["layout"] is None else BlockLayout(**info["layout"]),
        float(info["scale_a"]), info["metrics"], float(info["seconds"]),
        {(int(r[0]), str(r[1]), int(r[2])): (float(r[3]), float(r[4]))
         for r in info["necessity"]},
        {k: {"units": _units_from(v["units"]), "computes": tuple(v["computes"])}
         for k, v in info["parts"].items()},
    )  # fmt: skip


def _jsonable(x: Any) -> Any:
    """Plain JSON values (tuple keys become strings, tuples lists, tensors numbers)."""
    import json

    if isinstance(x, dict):
        return {(k if isinstance(k, str) else str(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, float) and math.isnan(x):
        return None
    json.dumps(x)  # raises on anything else
    return x
