"""Mask search: binary masks over a frozen model, trained to convergence on one subroutine's
training problems and chosen on VALIDATION problems (the test split is never looked at here).

The objective is 4-way cross-entropy on the subroutine's training problems plus an L0 penalty
(expected number of kept units, normalised by the number of units), under the experiment's one
ablation (:class:`~subroutine_circuits.masks.ablator.Ablator`). Training follows
:func:`~subroutine_circuits.experiment.converge.mask_schedule`: a budget in epochs, a validation
plateau stop, the best checkpoint kept, and continuous sparsification annealed to ``temp_max``
by the last step of the budget.

Every (grid point, mask seed, subroutine) is trained; for each subroutine the grid point with
the best mean validation accuracy over mask seeds is chosen, ties (within ``tolerance``) broken
by the smaller mean density. Two engines give the same masks: ``"batched"`` trains all unit
masks of a base model in one loop (:func:`~subroutine_circuits.experiment.converge.
train_masks_converged`); ``"separate"`` trains them one by one (:func:`train_mask_run`; weight
masks always run this way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from subroutine_circuits.adapters.base import EncodedProblems
from subroutine_circuits.experiment.config import MaskSearchConfig
from subroutine_circuits.experiment.converge import (
    MaskRun,
    MaskTrainer,
    Schedule,
    _Batch,
    mask_schedule,
)
from subroutine_circuits.experiment.schedule import DensityMultiplier, target_density
from subroutine_circuits.masks.ablator import Ablator
from subroutine_circuits.objectives import Objective, OddOneOut

__all__ = [
    "EncodedProblems",
    "SubroutineSearch",
    "accuracy",
    "choose_point",
    "encode",
    "grid_points",
    "make_mask",
    "mask_schedule",
    "search_all",
    "path_keeps",
    "search_mask",
    "train_mask",
    "train_mask_run",
]


def encode(adapter, problems, device: str | torch.device | None = None) -> EncodedProblems:
    """Encode a list of OOOProblem with the adapter's encoding (on ``device``, default the
    model's)."""
    if len(problems) == 0:
        raise ValueError("cannot encode an empty list of problems")
    return adapter.encode_problems(problems).to(device if device is not None else adapter.device)


def accuracy(adapter, data: EncodedProblems, mask=None, batch_size: int | None = None) -> float:
    """OOO accuracy of the adapter's model (under ``mask`` if given) on encoded problems."""
    return adapter.accuracy(data, mask, batch_size)


def make_mask(
    adapter,
    cfg: MaskSearchConfig,
    hp: dict[str, Any],
    seed: int,
    ablator: Ablator | None = None,
    ablation: str | None = None,
):
    """A fresh trainable mask (unit or weight) with hyperparameters ``hp``.

    Unit masks ablate with ``ablator`` (zero when None; mean values copied in), or with
    ``ablation`` when given (an objective's own, e.g. ``"resample"`` from corrupted prompts,
    whose values the objective sets per batch); weight masks always zero their masked weights.
    """
    from subroutine_circuits.masks import MaskConfig, UnitMask, WeightMask
    from subroutine_circuits.masks.ablator import apply_to_unit_mask

    ablator = ablator if ablator is not None else Ablator("zero")
    if ablation is not None and cfg.kind != "unit":
        raise ValueError(f"an objective with {ablation!r} ablation needs unit masks")
    kind = (ablation or ablator.kind) if cfg.kind == "unit" else "zero"
    mcfg = MaskConfig(
        parametrization=cfg.parametrization,
        init=float(hp.get("init", cfg.init)),
        ablation=kind,
        seed=seed,
    )
    if cfg.kind == "unit":
        unit_map = adapter.unit_map(kinds=cfg.unit_kinds, layers=hp.get("layers", cfg.layers))
        mask = UnitMask(unit_map, mcfg)
        return mask if ablation is not None else apply_to_unit_mask(mask, ablator)
    return WeightMask(adapter.model, mcfg, adapter.weight_names(), init_std=adapter.init_std())


def _set_temperature(mask, value: float) -> None:
    """Continuous sparsification: every part's temperature becomes ``value``."""
    from subroutine_circuits.masks.parametrization import ContinuousSparsification

    for p in mask.parts:
        if isinstance(p, ContinuousSparsification):
            p.temperature.fill_(value)


def train_mask_run(
    adapter,
    train: EncodedProblems,
    cfg: MaskSearchConfig,
    hp: dict[str, Any],
    seed: int,
    *,
    val: EncodedProblems | None = None,
    ablator: Ablator | None = None,
    schedule: Schedule | None = None,
    progress: bool = False,
    objective: Objective | None = None,
) -> MaskRun:
    """Train one mask with the base model frozen; returns the best validation checkpoint.

    ``objective`` (default: the study's odd-one-out readout) gives the loss on a training batch
    and the validation score; ``train`` / ``val`` are its data (``EncodedProblems``, or
    ``PromptPairs`` for prompt-pair objectives). Without ``val`` there is no evaluation and no
    early stop: the mask after the whole budget. The loop is the study's
    (:class:`~subroutine_circuits.experiment.converge.MaskTrainer`) with one mask of any kind.
    """
    trainer = _SingleMaskTrainer(adapter, train, cfg, hp, seed, val, ablator, schedule, objective)
    return trainer.run(progress, "mask")[0]


class _SingleMaskTrainer(MaskTrainer):
    """One mask (unit or weight) under an objective, trained by the one mask loop."""

    def __init__(self, adapter, train, cfg, hp, seed, val, ablator, schedule, objective):
        self.objective = objective if objective is not None else OddOneOut()
        schedule = schedule if schedule is not None else mask_schedule(cfg, len(train))
        super().__init__(
            schedule,
            [_Batch(0, 0, len(train), 0, seed, schedule.plateau(target_density(cfg, hp)))],
            val is not None,
        )
        adapter.freeze()
        torch.manual_seed(seed)
        self.adapter, self.train_data, self.val, self.cfg = adapter, train, val, cfg
        self.device = adapter.device
        mask = make_mask(adapter, cfg, hp, seed, ablator, self.objective.ablation)
        self.mask = mask.to(self.device)
        self.mask.train()
        self.opt = torch.optim.Adam(
            [p for p in self.mask.parameters() if p.requires_grad], lr=float(hp.get("lr", cfg.lr))
        )
        self.sparsity = DensityMultiplier.for_grid(cfg, [hp]).to(self.device)
        self.n_units = max(1, int(self.mask.flat_binary().numel()))
        self.temp: float | None = None

    def step(self, step: int) -> None:
        """One optimiser step: the objective's loss on the next minibatch plus the sparsity
        term (a fixed L0 weight, or the target density's multiplier, updated by dual ascent on
        the binary-kept share)."""
        mask, sparsity, b = self.mask, self.sparsity, self.alive[0]
        idx = torch.tensor(b.draw(self.cfg.batch_size), device=self.device)
        fit = self.objective.loss(self.adapter, mask, self.train_data.batch(idx))
        penalty = mask.penalty()
        soft = mask.soft_count().reshape(1) if sparsity.any_target else None
        term = sparsity.penalty([0], sparsity.weight([0]), penalty.reshape(1), self.n_units, soft)
        loss = fit + term[0]
        if not torch.isfinite(loss):
            raise ValueError(f"mask training produced a non-finite loss at step {step - 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if soft is not None:
            sparsity.update([0], soft.detach() / self.n_units)
        if self.cfg.parametrization == "continuous":
            self.temp = self.schedule.temperature(step)
            _set_temperature(mask, self.temp)

    def validate(self, step: int) -> tuple[list[float], list[float]]:
        """The objective's score of the binary mask on the validation data, and its density."""
        self.mask.eval()
        score = self.objective.score(self.adapter, self.val, self.mask)
        density = self.mask.density()
        self.mask.train()
        return [score], [density]

    def snapshot(self, row: int) -> dict[str, Tensor]:
        """The mask's parameters and buffers."""
        return {k: v.detach().clone() for k, v in self.mask.state_dict().items()}

    def results(self) -> list[MaskRun]:
        """The best checkpoint (the last state without validation data)."""
        b = (self.done + self.alive)[0]
        if b.best is not None:
            self.mask.load_state_dict(b.best)
        self.mask.eval()
        p = b.plateau
        val_acc = p.best_acc if self.validates else math.nan
        stopped = b.steps < self.schedule.steps
        run = MaskRun(self.mask, val_acc, self.mask.density(), b.steps, p.best_step or b.steps,
                      self.temp, stopped, list(p.history))  # fmt: skip
        return [run]


def train_mask(
    adapter,
    train: EncodedProblems,
    cfg: MaskSearchConfig,
    hp: dict[str, Any],
    seed: int,
    progress: bool = False,
    pool: str | None = None,
    **kwargs: Any,
):
    """:func:`train_mask_run`, returning only the mask (eval mode). ``adapter`` may also be a
    plain model (wrapped with ``as_adapter(model, pool=pool)``)."""
    if not hasattr(adapter, "ooo_logits"):
        from subroutine_circuits.adapters import as_adapter

        adapter = as_adapter(adapter, pool=pool)
    return train_mask_run(adapter, train, cfg, hp, seed, progress=progress, **kwargs).mask


def grid_points(cfg: MaskSearchConfig) -> list[dict[str, Any]]:
    """The hyperparameter points to compare (at least one: the defaults)."""
    return [dict(p) for p in cfg.grid] or [{}]


def choose_point(
    runs: dict[tuple[int, int], MaskRun],
    n_points: int,
    tolerance: float,
    rule: str = "accurate",
    min_acc: float = 0.0,
) -> tuple[int, list[dict[str, Any]]]:
    """The chosen grid point from ``runs[(point, seed)]``, and the log of every point.

    ``rule = "accurate"``: best mean validation accuracy over mask seeds; points within
    ``tolerance`` of it count as equal and the one with the smaller mean density wins (then
    higher accuracy, then order). ``rule = "smallest"``: the point of smallest mean density
    whose mean validation accuracy reaches ``min_acc`` (the success threshold; then higher
    accuracy, then order), or the ``"accurate"`` choice when no point reaches it.
    """
    if rule not in ("accurate", "smallest"):
        raise ValueError(f"unknown choice rule {rule!r}; choose 'accurate' or 'smallest'")
    log = []
    for p in range(n_points):
        rs = [r for (q, _), r in sorted(runs.items()) if q == p]
        accs = [r.val_acc for r in rs]
        log.append(
            {
                "val_acc": sum(accs) / len(accs),
                "density": sum(r.density for r in rs) / len(rs),
                "runs": {str(s): r.info() for (q, s), r in sorted(runs.items()) if q == p},
            }
        )
    best = max(e["val_acc"] for e in log)
    eligible = [i for i, e in enumerate(log) if e["val_acc"] >= best - tolerance]
    reaching = [i for i, e in enumerate(log) if e["val_acc"] >= min_acc]
    if rule == "smallest" and reaching:
        eligible = reaching
    return min(eligible, key=lambda i: (log[i]["density"], -log[i]["val_acc"], i)), log


@dataclass
class SubroutineSearch:
    """The search of one subroutine: chosen point, the log of every point, the chosen runs."""

    hp: dict[str, Any]
    log: list[dict[str, Any]]
    runs: dict[int, MaskRun] = field(default_factory=dict)  # mask seed -> run at the chosen hp


def _jobs(subs: list[str], points: list[dict], seeds: list[int]) -> list[tuple[str, int, int]]:
    """Every (subroutine, grid point index, mask seed) to train, in a fixed order."""
    return [(s, p, m) for s in subs for p in range(len(points)) for m in seeds]


def _train_all(adapter, train, val, cfg, jobs, points, ablator, engine, progress):
    """Train every job; returns ``{job: MaskRun}``."""
    from subroutine_circuits.experiment.converge import train_masks_converged
    from subroutine_circuits.utils import autocast_dtype

    subs = sorted({s for s, _, _ in jobs}, key=[j[0] for j in jobs].index)
    n_train = max(len(train[s]) for s in subs)
    schedule = mask_schedule(cfg, n_train)
    autocast = getattr(cfg, "autocast", "none")
    if engine == "separate" or cfg.kind != "unit":
        if autocast != "none":
            raise ValueError(
                f"mask.autocast = {autocast!r} runs in the batched unit-mask engine only; set "
                "mask.engine = 'batched' and mask.kind = 'unit', or autocast = 'none'"
            )
        return {
            (s, p, m): train_mask_run(
                adapter,
                train[s],
                cfg,
                points[p],
                m,
                val=val[s],
                ablator=ablator,
                schedule=schedule,
                progress=progress,
            )
            for s, p, m in jobs
        }
    out: dict = {}
    groups: dict[str, list] = {}
    for j in jobs:  # one batched loop per unit map (grid points may choose other layers)
        groups.setdefault(repr(points[j[1]].get("layers", cfg.layers)), []).append(j)
    for group in groups.values():
        runs = train_masks_converged(
            adapter.model,
            [train[s] for s in subs],
            [val[s] for s in subs],
            cfg,
            [points[p] for _, p, _ in group],
            [m for _, _, m in group],
            schedule,
            ablator,
            getattr(adapter, "pool", None),
            data_index=[subs.index(s) for s, _, _ in group],
            noise=cfg.noise,
            autocast_dtype=autocast_dtype(autocast),
            progress=progress,
            adapter=adapter,  # scores inputs without tokens (images)
        )
        out.update(zip(group, runs))
    return out


def search_all(
    adapter,
    train: dict[str, EncodedProblems],
    val: dict[str, EncodedProblems],
    cfg: MaskSearchConfig,
    seeds: list[int],
    ablator: Ablator,
    engine: str = "batched",
    progress: bool = False,
    min_acc: float = 0.0,
) -> dict[str, SubroutineSearch]:
    """Train every (subroutine, grid point, mask seed) and choose each subroutine's point.

    ``train`` / ``val`` map subroutine names to their own problems (``sub_<name>``). With
    ``cfg.prune`` the chosen masks whose validation accuracy reaches ``min_acc`` (the study's
    ``mask_min_acc``: the others are failed searches, and stay so) get the minimality pass.
    """
    if engine not in ("batched", "separate"):
        raise ValueError(f"unknown mask engine {engine!r}; choose 'batched' or 'separate'")
    if cfg.prunes and cfg.kind != "unit":
        raise ValueError(
            f"mask.prune drops units: it applies to mask.kind = 'unit', not {cfg.kind!r}"
        )
    points = grid_points(cfg)
    subs = list(train)
    runs = _train_all(
        adapter, train, val, cfg, _jobs(subs, points, seeds), points, ablator, engine, progress
    )
    out = {}
    for s in subs:
        mine = {(p, m): r for (t, p, m), r in runs.items() if t == s}
        best, log = choose_point(
            mine, len(points), cfg.tolerance, getattr(cfg, "choose", "accurate"), min_acc
        )
        for i, e in enumerate(log):
            e["hp"] = points[i]
        chosen = {m: mine[(best, m)] for m in seeds}
        if cfg.prunes:
            chosen = {m: prune_run(adapter, val[s], r, ablator, cfg.tolerance, min_acc=min_acc)
                      if r.val_acc >= min_acc else r for m, r in chosen.items()}  # fmt: skip
        out[s] = SubroutineSearch(points[best], log, chosen)
    return out


def path_keeps(
    adapter,
    train: EncodedProblems,
    val: EncodedProblems,
    cfg: MaskSearchConfig,
    hp: dict[str, Any],
    seed: int,
    sizes: list[int],
    ablator: Ablator,
    engine: str = "batched",
    progress: bool = False,
) -> tuple[Bool[Tensor, "s n_units"], list[dict[str, Any]]]:
    """The learned mask's sparsity path at the frontier's ``sizes`` (unit counts).

    For every distinct size ``0 < k < n_units`` one mask is trained on ``train`` (validation
    on ``val``) with grid point ``hp`` (the subroutine's chosen point) and target density
    ``k / n_units``, all in one loop of the study's engine under the study's ablation and
    schedule; its best *feasible* checkpoint (at most ``k`` units kept, see
    :class:`~subroutine_circuits.experiment.schedule.Plateau`) gives the size-``k`` circuit:
    its kept units, then its other units by logit, cut at ``k`` (a mask that ends below its
    target is filled up in the order of its own logits). Row ``i`` of the result keeps exactly
    ``sizes[i]`` units (none for 0, all for ``n_units``). The second value has one entry per
    trained size: ``k``, the mask's own kept count, its validation accuracy, whether it met
    its target, steps and best step (one entry per distinct size).
    """
    from subroutine_circuits.experiment.patching import mask_unit_params
    from subroutine_circuits.patching.frontier import mask_order

    n = adapter.unit_map(kinds=cfg.unit_kinds, layers=hp.get("layers", cfg.layers)).n_units
    distinct = sorted({int(k) for k in sizes if 0 < k < n})
    points = [{**hp, "target_density": k / n} for k in distinct]
    jobs = [("path", p, int(seed)) for p in range(len(points))]
    runs = (
        _train_all(adapter, {"path": train}, {"path": val}, cfg, jobs, points, ablator, engine,
                   progress)
        if jobs else {}
    )  # fmt: skip
    keep = torch.zeros(len(sizes), n, dtype=torch.bool)
    log = []
    for i, k in enumerate(sizes):
        if k >= n:
            keep[i] = True
        if not 0 < k < n:
            continue
        run = runs[jobs[distinct.index(k)]]
        binary = run.mask.flat_binary().bool().cpu()
        keep[i, mask_order(binary, mask_unit_params(run.mask))[:k]] = True
        if any(e["k"] == k for e in log):  # sizes repeat where fractions round alike
            continue
        log.append({
            "k": int(k), "kept": int(binary.sum()), "val_acc": float(run.val_acc),
            "feasible": bool(int(binary.sum()) <= k), "steps": int(run.steps),
            "best_step": int(run.best_step),
        })  # fmt: skip
    return keep, log


#: Rounds of the minimality pass (each: two batched passes); the first removes nearly all.
PRUNE_ROUNDS = 2
#: Validation problems the per-unit ranking of the pass is computed on (the first ones); the
#: accuracy that decides what is removed is always measured on every validation problem.
PRUNE_RANK_PROBLEMS = 48
#: Largest mask (units left after the prefix rounds) the 1-minimal finish runs on: each of its
#: steps evaluates every kept unit's removal on every validation problem, so its cost grows
#: with the square of the mask (a compute bound: larger masks keep the prefix rounds' result,
#: and ``pruned["finish"]`` says so).
PRUNE_FINISH_MAX_UNITS = 32
#: Blocks the cheap minimality measure of masks too large for the finish splits them into.
PRUNE_BLOCKS = 8


def prefix_sizes(k: int) -> list[int]:
    """Numbers of lowest-ranked units the minimality pass tries removing at once: every size up
    to 8, then sizes growing by about a quarter, and ``k`` itself (about 8 + 4.5 log2(k/8))."""
    sizes, n = set(range(1, min(k, 8) + 1)), 8
    while n < k:
        n = max(n + 1, round(n * 1.25))
        sizes.add(min(n, k))
    return sorted(sizes)


def prune_run(
    adapter,
    val: EncodedProblems,
    run: MaskRun,
    ablator: Ablator,
    tolerance: float,
    *,
    min_acc: float = 0.0,
    finish_max_units: int = PRUNE_FINISH_MAX_UNITS,
) -> MaskRun:
    """The minimality pass: ``run`` with the kept units it does not need dropped.

    Why: masks are trained on cross-entropy, which keeps rewarding units that only make
    already-correct answers more confident, so a converged mask can hold units its subroutine
    does not need (on planted modular models, live units of the *other* subroutine: ablating
    the mask then breaks both partitions). The verdict is about accuracy, so the subnetwork is
    made minimal by accuracy, on the same VALIDATION problems the search chose on.

    Rounds of: the accuracy without each kept unit on the first :data:`PRUNE_RANK_PROBLEMS`
    validation problems (one batched pass), the units sorted from least to most harmful
    (stable), the accuracy on *every* validation problem with the ``n`` least harmful removed
    for ``n`` in :func:`prefix_sizes` (one batched pass), and the largest ``n`` whose accuracy
    is at least the chosen mask's minus ``tolerance`` (and at least ``min_acc``, the study's
    ``mask_min_acc``, when the chosen mask reached it: a usable mask stays usable) removed;
    until a round removes nothing, at most :data:`PRUNE_ROUNDS` rounds. Then the **finish**,
    which makes the mask 1-minimal: the accuracy and cross-entropy without each kept unit on
    every validation problem (one batched pass), and, of the removals whose accuracy stays at or
    above that floor, the one with the lowest cross-entropy made; repeated until no single unit
    can go. Why the finish: the prefixes follow one ranking, computed with every kept unit
    present, so they cannot see that removing one unit makes others useless; in a model with two
    copies of a subroutine every single unit looks harmless and the prefixes cut into both
    copies. The finish re-measures after every removal, so the result is 1-minimal; it is not
    the smallest subnetwork: on the earlier planted redundant models (copies of 5-12 units) a
    1-minimal mask still spanned both copies in about half of the runs (README, "Ground truth").
    The finish runs on masks of at most ``finish_max_units`` units after the prefix rounds
    (:data:`PRUNE_FINISH_MAX_UNITS`; its cost grows with the square of the mask); a larger mask
    gets the cheap measure :func:`block_removable` instead (``pruned["block_removable"]``). At
    least one unit stays. ``run.pruned`` records the accuracy and units before, the units
    dropped, the rounds, whether the finish ran and its removals, the last round's ranking
    (``ranking``: unit indices, least harmful first); ``val_acc`` and ``density`` are the pruned
    mask's. The mask is changed in place (``drop``).
    """
    from dataclasses import replace

    from subroutine_circuits.experiment.evaluate import fixed_accuracies

    mask = run.mask
    unit_map = mask.unit_map
    keep = mask.flat_binary().clone()
    rank_val = ranking_problems(val)
    start = float(fixed_accuracies(adapter, val, keep[None], unit_map, ablator)[0])
    floor = minimality_floor(start, tolerance, min_acc)
    n0, current, used = int(keep.sum()), start, 0
    order: Tensor | None = None  # the last round's ranking, reused by block_removable
    for _ in range(PRUNE_ROUNDS):
        if int(keep.sum()) <= 1:
            break
        used += 1
        kept, without = _each_removed(keep)
        single = torch.tensor(fixed_accuracies(adapter, rank_val, without, unit_map, ablator))
        order = kept[torch.sort(-single, stable=True).indices]
        sizes = prefix_sizes(len(kept) - 1)
        prefixes = keep.repeat(len(sizes), 1)
        for row, n in enumerate(sizes):
            prefixes[row, order[:n]] = False  # row: the n least harmful removed
        accs = fixed_accuracies(adapter, val, prefixes, unit_map, ablator, floor)
        ok = [row for row, a in enumerate(accs) if a >= floor]
        if not ok:
            break
        row = max(ok)
        keep, current = prefixes[row].clone(), float(accs[row])
    finished, finish = 0, f"skipped: more than {finish_max_units} units"
    elimination = None
    if int(keep.sum()) <= finish_max_units:
        keep, current, finished = finish_1_minimal(
            adapter, val, keep, current, floor, unit_map, ablator
        )
        finish, removable = "1-minimal", 0
        elimination = elimination_order(adapter, val, keep, unit_map, ablator)
    else:
        removable = block_removable(adapter, val, rank_val, keep, floor, unit_map, ablator,
                                    order=order)  # fmt: skip
    dropped = mask.flat_binary() & ~keep
    if bool(dropped.any()):
        mask.drop(dropped)
    info = {"val_acc_before": start, "units_before": n0, "units_dropped": int(dropped.sum()),
            "rounds": used, "finish": finish, "finish_dropped": finished,
            "block_removable": removable,
            # the last round's single-removal ranking (unit indices, least harmful first):
            # the mask's own order of its units, which frontier.csv's mask ranking uses
            "ranking": None if order is None else [int(u) for u in order],
            # the 1-minimal mask's units in the order a re-measured backward elimination
            # removes them (least important first; elimination_order), when the finish ran
            "elimination": elimination}  # fmt: skip
    return replace(run, mask=mask, val_acc=current, density=mask.density(), pruned=info)


def block_removable(
    adapter,
    val: EncodedProblems,
    rank_val: EncodedProblems,
    keep: Bool[Tensor, " n_units"],
    floor: float,
    unit_map: Any,
    ablator: Ablator,
    n_blocks: int = PRUNE_BLOCKS,
    order: Tensor | None = None,
) -> int:
    """A cheap minimality measure of a mask too large for the 1-minimal finish: how many of its
    kept units lie in a block whose removal alone keeps the validation accuracy at or above
    ``floor`` (0: no block can go; a 1-minimal mask scores 0).

    The kept units are ranked from least to most harmful to remove (each one's removal on
    ``rank_val``, one batched pass, stable order; or ``order``, a ranking of a superset of
    them such as the minimality pass's last round, whose kept units are taken in that order)
    and cut into ``n_blocks`` consecutive blocks of near-equal size; each block's removal is
    measured on every ``val`` problem (one batched pass). A large count says the mask still
    holds units its subroutine does not need (issue 23: masks of hundreds of units are not a
    subroutine's circuit); it is a lower bound of what could go, not a removal."""
    from subroutine_circuits.experiment.evaluate import fixed_accuracies

    if order is None:
        kept, without = _each_removed(keep)
        if len(kept) == 0:
            return 0
        single = torch.tensor(fixed_accuracies(adapter, rank_val, without, unit_map, ablator))
        order = kept[torch.sort(-single, stable=True).indices]
    else:
        order = order[keep[order]]
        if len(order) == 0:
            return 0
    blocks = [b for b in torch.tensor_split(order, min(n_blocks, len(order))) if len(b)]
    rows = keep.repeat(len(blocks), 1)
    for row, block in enumerate(blocks):
        rows[row, block] = False
    accs = fixed_accuracies(adapter, val, rows, unit_map, ablator, floor)
    return int(sum(len(b) for b, a in zip(blocks, accs) if a >= floor))


def _each_removed(
    keep: Bool[Tensor, " n_units"],
) -> tuple[Tensor, Bool[Tensor, "n_kept n_units"]]:
    """The kept unit indices and ``keep`` once per kept unit with that unit removed (row i:
    without ``kept[i]``), the candidates the minimality pass scores in one batched pass."""
    kept = keep.nonzero().flatten()
    without = keep.repeat(len(kept), 1)
    without[torch.arange(len(kept)), kept] = False
    return kept, without


def elimination_order(
    adapter,
    val: EncodedProblems,
    keep: Bool[Tensor, " n_units"],
    unit_map: Any,
    ablator: Ablator,
) -> list[int]:
    """The kept units of ``keep`` in the order a greedy backward elimination removes them,
    least important first: at each step every remaining unit's removal is measured on every
    validation problem (one batched pass) and the one leaving the highest accuracy goes (ties:
    the lowest cross-entropy, then unit order), until one unit is left, which comes last.

    Why: below a 1-minimal mask's size every removal costs accuracy, and a ranking measured
    once with every unit present cannot see that removing one unit makes another useless or
    indispensable; re-measuring after each removal gives the mask's own nested circuits at every
    smaller size (the frontier's mask ranking). Its cost grows with the square of the mask, so
    :func:`prune_run` runs it where it runs the 1-minimal finish."""
    from subroutine_circuits.experiment.evaluate import fixed_accuracies_losses

    keep = keep.clone()
    out: list[int] = []
    while int(keep.sum()) > 1:
        kept, without = _each_removed(keep)
        acc, loss = fixed_accuracies_losses(adapter, val, without, unit_map, ablator)
        key = [(-float(a), float(c), i) for i, (a, c) in enumerate(zip(acc, loss))]
        best = min(key)[2]
        out.append(int(kept[best]))
        keep = without[best].clone()
    out += [int(u) for u in keep.nonzero().flatten()]
    return out


#: Dropped units the forward selection of :func:`addition_order` considers (those with the
#: highest mask logits): a compute bound (each added unit costs one pass over them).
ADD_CANDIDATES = 16


def addition_order(
    adapter,
    val: EncodedProblems,
    keep: Bool[Tensor, " n_units"],
    unit_map: Any,
    ablator: Ablator,
    params: Tensor,
    max_units: int,
) -> list[int]:
    """Dropped units in the order a greedy forward selection adds them to ``keep``: at each
    step every candidate's addition is measured on every validation problem (one batched pass)
    and the one giving the highest accuracy joins (ties: the lowest cross-entropy, then the
    higher logit), until ``max_units`` units are kept or no candidate is left. Candidates: the
    :data:`ADD_CANDIDATES` dropped units with the highest ``params`` (the mask's logits).

    Why: above a mask's own size the frontier asks which units it would add; the logits of
    units the mask learned to drop say little, while re-measuring each addition with the mask's
    objective on validation data gives its nested circuits at every larger size (the frontier
    runs it up to its largest size within the 1-minimal finish's bound,
    :func:`~subroutine_circuits.experiment.stages.mask_ranking`; its cost: one pass over the
    candidates per added unit)."""
    from subroutine_circuits.experiment.evaluate import fixed_accuracies_losses

    keep = keep.clone()
    dropped = (~keep).nonzero().flatten()
    ranked = dropped[torch.sort(-params[dropped].float(), stable=True).indices]
    candidates = ranked[:ADD_CANDIDATES].tolist()
    out: list[int] = []
    while candidates and int(keep.sum()) < max_units:
        rows = keep.repeat(len(candidates), 1)
        rows[torch.arange(len(candidates)), torch.tensor(candidates)] = True
        acc, loss = fixed_accuracies_losses(adapter, val, rows, unit_map, ablator)
        key = [(-float(a), float(c), i) for i, (a, c) in enumerate(zip(acc, loss))]
        best = candidates.pop(min(key)[2])
        out.append(int(best))
        keep[best] = True
    return out


def ranking_problems(val: EncodedProblems) -> EncodedProblems:
    """The validation problems the minimality pass ranks units on: the first
    :data:`PRUNE_RANK_PROBLEMS` (the accuracy that decides what is removed uses them all)."""
    return val.batch(torch.arange(min(len(val), PRUNE_RANK_PROBLEMS)))


def minimality_floor(start: float, tolerance: float, min_acc: float) -> float:
    """The validation accuracy the minimality pass keeps a mask of accuracy ``start`` at:
    within ``tolerance`` of it, and at least ``min_acc`` when the mask reached that (a usable
    mask stays usable)."""
    return max(start - tolerance, min(min_acc, start))


def finish_1_minimal(
    adapter,
    val: EncodedProblems,
    keep: Bool[Tensor, " n_units"],
    current: float,
    floor: float,
    unit_map: Any,
    ablator: Ablator,
) -> tuple[Bool[Tensor, " n_units"], float, int]:
    """The finish of :func:`prune_run`: single removals, lowest validation cross-entropy first
    among those whose accuracy stays at or above ``floor``, until none is left (``keep`` is
    then 1-minimal on validation). Returns ``(keep, its accuracy, removals)``."""
    from subroutine_circuits.experiment.evaluate import fixed_accuracies_losses

    removed = 0
    while int(keep.sum()) > 1:
        _, without = _each_removed(keep)
        acc, loss = fixed_accuracies_losses(adapter, val, without, unit_map, ablator, floor)
        ok = acc >= floor
        if not bool(ok.any()):
            break
        best = int(torch.where(ok, loss, torch.full_like(loss, math.inf)).argmin())
        keep, current, removed = without[best].clone(), float(acc[best]), removed + 1
    return keep, current, removed


def search_mask(
    adapter,
    train: EncodedProblems,
    val: EncodedProblems,
    cfg: MaskSearchConfig,
    seed: int,
    ablator: Ablator | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """One subroutine, one mask seed: ``(chosen hp, log, chosen mask)`` (separate engine)."""
    res = search_all(
        adapter,
        {"sub": train},
        {"sub": val},
        cfg,
        [seed],
        ablator if ablator is not None else Ablator("zero"),
        "separate",
    )["sub"]
    return res.hp, res.log, res.runs[seed].mask
