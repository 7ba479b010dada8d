"""The budget and stopping rule of mask training: a budget in epochs (or steps), a validation
plateau, and continuous sparsification's temperature annealed to ``temp_max`` by the last step
(used by the converged engine, ``experiment.converge``, and the batched one,
``experiment.batched``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """Budget and stopping rule of mask training.

    Attributes:
        steps: optimiser steps at most (the budget).
        eval_every: evaluate the binary mask on validation problems every this many steps
            (and after the last step).
        patience: stop after this many evaluations without improvement (0: never early).
        temp_max: continuous sparsification's temperature after the last step of the budget.
        tolerance: accuracy within this of the best counts as equal (then sparser is better).
        min_density_drop: at equal accuracy, a checkpoint must keep at least this share of
            units fewer than the best one to count as an improvement.
    """

    steps: int
    eval_every: int
    patience: int = 3
    temp_max: float = 200.0
    tolerance: float = 0.02
    min_density_drop: float = 0.01

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError(
                f"steps and eval_every must be >= 1, got {self.steps}, {self.eval_every}"
            )
        if self.patience < 0 or not self.temp_max >= 1 or self.tolerance < 0:
            raise ValueError("patience must be >= 0, temp_max >= 1 and tolerance >= 0")

    def temperature(self, step: int) -> float:
        """Continuous sparsification's temperature after ``step`` optimiser steps."""
        return float(self.temp_max ** (min(step, self.steps) / self.steps))

    def plateau(self, max_density: float | None = None) -> Plateau:
        """A fresh :class:`Plateau` with this schedule's stopping rule (``max_density``: the
        mask's target density, which its best checkpoint must meet)."""
        return Plateau(self.tolerance, self.patience, self.min_density_drop, max_density)

    def evaluates_after(self, step: int) -> bool:
        """Whether an evaluation follows optimiser step ``step`` (1-based)."""
        return step % self.eval_every == 0 or step == self.steps


def budget_steps(epochs: float, n_train: int, batch_size: int) -> int:
    """Optimiser steps of ``epochs`` passes over ``n_train`` problems at ``batch_size``."""
    if epochs <= 0 or n_train < 1 or batch_size < 1:
        raise ValueError(
            f"need epochs > 0, n_train >= 1, batch_size >= 1 (got {epochs}, "
            f"{n_train}, {batch_size})"
        )
    return max(1, math.ceil(epochs * n_train / batch_size))


class Plateau:
    """The best checkpoint so far and the patience counter of one mask.

    An evaluation is the new best when its accuracy exceeds every earlier one, or when it lies
    within ``tolerance`` of the best accuracy seen and keeps at least ``min_density_drop`` fewer
    units (as a share) than the current best.

    A mask with a target density (``max_density``) is a constrained search: only checkpoints
    that keep at most that share of units (*feasible* ones) compete for the best. Until the
    first feasible evaluation the latest checkpoint stands in as the best (the closest to the
    constraint so far) and patience does not run, so a mask still being pushed down to its
    target is never stopped for want of accuracy gains; a mask that never gets there returns
    its last evaluated checkpoint, with ``feasible`` False.
    """

    def __init__(
        self,
        tolerance: float,
        patience: int,
        min_density_drop: float = 0.0,
        max_density: float | None = None,
    ):
        self.tolerance, self.patience = float(tolerance), int(patience)
        self.min_density_drop = float(min_density_drop)
        self.max_density = None if max_density is None else float(max_density)
        self.max_acc = -1.0
        self.best_acc, self.best_density, self.best_step = -1.0, math.inf, 0
        self.since = 0
        self.feasible = max_density is None
        self.history: list[tuple[int, float, float]] = []

    def update(self, acc: float, density: float, step: int) -> bool:
        """Record an evaluation; returns True when it is the new best checkpoint."""
        self.history.append((int(step), float(acc), float(density)))
        if self.max_density is not None and density > self.max_density + 1e-9:
            if self.feasible:  # denser than the target after a feasible one: no improvement
                self.since += 1
                return False
            self.best_acc, self.best_density, self.best_step = acc, density, step
            return True
        if not self.feasible:  # the first feasible checkpoint replaces the stand-in
            self.feasible = True
            self.best_density = math.inf
        better = acc > self.max_acc or (
            acc >= self.max_acc - self.tolerance
            and density < self.best_density - self.min_density_drop
        )
        self.max_acc = max(self.max_acc, acc)
        if better:
            self.best_acc, self.best_density, self.best_step = acc, density, step
            self.since = 0
        else:
            self.since += 1
        return better

    @property
    def stopped(self) -> bool:
        """Whether ``patience`` evaluations passed without improvement."""
        return self.patience > 0 and self.since >= self.patience


#: Dual-ascent step of a target density's multiplier (``[mask] target_lr``'s default), set on a
#: tiny trained model's training problems (README, "Sparsity path").
TARGET_LR = 0.05


def _point_value(cfg: Any, hp: Any, name: str, default: Any) -> Any:
    """Grid point ``hp``'s value of ``name``, else the ``[mask]`` table's, else ``default``."""
    v = hp.get(name)
    return getattr(cfg, name, default) if v is None else v


def target_density(cfg: Any, hp: Any) -> float | None:
    """The target density of grid point ``hp`` (else ``[mask] target_density``; None: none)."""
    v = _point_value(cfg, hp, "target_density", None)
    return None if v is None else float(v)


class DensityMultiplier:
    """The sparsity term of each mask's loss: a fixed weight on its density, or, for a mask with
    a target density, a hinge on the excess over the target whose weight is a Lagrange
    multiplier raised by dual ascent while the mask is denser than its target.

    Masks without a target add ``l0_weight * expected_L0 / n_units`` (computed in exactly that
    order, as always). A mask with target ``t`` adds ``lambda * relu(density - t)`` (density:
    a differentiable share of the units the *binary* mask keeps, ``soft_count / n_units``,
    e.g. ``mean sigmoid(log_alpha)`` for hard concrete, whose binary mask is
    ``log_alpha > 0``: the expected L0 would overcount undecided units); ``lambda`` starts at
    the mask's ``l0_weight`` and after
    every optimiser step becomes ``lambda + lr * relu(density - t)``: it grows while the mask
    keeps more than ``t`` of its units, so the constraint ``density <= t`` is enforced however
    much cross-entropy it costs (the Lagrangian relaxation of structured pruning, as in Edge
    Pruning, Bhaskar et al. 2024), and below the target the term vanishes, so nothing pushes
    the mask further down than the cross-entropy wants. A grid of targets is a sparsity path;
    the search then chooses among its points on validation data.
    """

    def __init__(self, l0: Any, targets: Any, lr: Any):
        import torch

        self.weights = torch.as_tensor(l0, dtype=torch.float32).clone()
        self.targets = torch.as_tensor(targets, dtype=torch.float32).clone()
        if self.weights.shape != self.targets.shape or self.weights.ndim != 1:
            raise ValueError("l0 weights and targets must be 1-d of equal length")
        self.lr = torch.as_tensor(lr, dtype=torch.float32).expand(self.weights.shape).clone()
        if bool((self.lr <= 0).any()):
            raise ValueError(f"target_lr must be > 0, got {self.lr.tolist()}")
        bad = self.targets[~torch.isnan(self.targets)]
        if bool(((bad <= 0) | (bad >= 1)).any()):
            raise ValueError(f"target densities must lie in (0, 1), got {bad.tolist()}")
        self.constrained = ~torch.isnan(self.targets)
        #: whether any mask has a target (a host bool: the training step never syncs for it)
        self.any_target = bool(self.constrained.any())

    @classmethod
    def for_grid(cls, cfg: Any, hps: Any) -> DensityMultiplier:
        """The multipliers of grid points ``hps`` (each point's ``l0_weight``,
        ``target_density`` and ``target_lr``, else the ``[mask]`` table's)."""
        return cls(
            [float(_point_value(cfg, h, "l0_weight", 1.0)) for h in hps],
            [float(target_density(cfg, h) or math.nan) for h in hps],
            [float(_point_value(cfg, h, "target_lr", TARGET_LR)) for h in hps],
        )

    def to(self, device: Any) -> DensityMultiplier:
        """Move the weights to ``device`` (in place); returns self."""
        self.targets, self.lr = self.targets.to(device), self.lr.to(device)
        self.constrained, self.weights = self.constrained.to(device), self.weights.to(device)
        return self

    def weight(self, rows: Any) -> Any:
        """The current weights of masks ``rows`` (indices into the grid): the fixed l0 weight,
        or the multiplier of a mask with a target."""
        return self.weights[rows]

    def penalty(
        self, rows: Any, weight: Any, l0_count: Any, n_units: int, soft_count: Any = None
    ) -> Any:
        """The sparsity term of masks ``rows`` (``[k]``): ``weight`` from :meth:`weight`
        (taken before the step), ``l0_count`` their penalties (expected numbers of kept
        units), ``soft_count`` their differentiable counts of binary-kept units (the
        constrained density; needed when a row has a target)."""
        import torch

        fixed = weight * l0_count / n_units
        if not self.any_target:
            return fixed
        rows = torch.as_tensor(rows, device=self.weights.device)
        excess = torch.relu(soft_count / n_units - self.targets[rows].nan_to_num(0.0))
        return torch.where(self.constrained[rows], weight * excess, fixed)

    def update(self, rows: Any, density: Any) -> None:
        """Dual ascent after a step: ``density`` (detached expected densities of ``rows``)."""
        import torch

        rows = torch.as_tensor(rows, device=self.weights.device)
        excess = torch.relu(density.detach().float() - self.targets[rows].nan_to_num(0.0))
        stepped = self.weights[rows] + self.lr[rows] * excess
        self.weights[rows] = torch.where(self.constrained[rows], stepped, self.weights[rows])


def mask_schedule(cfg: Any, n_train: int) -> Schedule:
    """The :class:`Schedule` of a ``MaskSearchConfig`` for ``n_train`` training problems.

    The budget is ``cfg.steps`` when set, else ``cfg.epochs`` passes at ``cfg.batch_size``;
    evaluations every ``cfg.eval_every`` steps, or once per epoch when that is None.
    """
    bsz = int(cfg.batch_size)
    steps = getattr(cfg, "steps", None)
    steps = int(steps) if steps is not None else budget_steps(cfg.epochs, n_train, bsz)
    every = getattr(cfg, "eval_every", None) or math.ceil(n_train / bsz)
    return Schedule(
        steps=steps,
        eval_every=max(1, min(int(every), steps)),
        patience=int(getattr(cfg, "patience", 0)),
        temp_max=float(getattr(cfg, "temp_max", 200.0)),
        tolerance=float(getattr(cfg, "tolerance", 0.02)),
        min_density_drop=float(getattr(cfg, "min_density_drop", 0.0)),
    )


#: The share of the budget at its end in which a search that still improves is budget-limited.
BUDGET_TAIL = 0.1


def budget_limited(
    steps: int,
    best_step: int,
    stopped_early: bool,
    history: list[tuple[int, float, float]] | list[list[float]],
    min_density_drop: float = 0.0,
    tail: float = BUDGET_TAIL,
) -> bool:
    """Whether a mask search ended because its budget ran out while it was still improving:
    it ran the whole budget (no plateau stop) and either its chosen checkpoint lies in the last
    ``tail`` of the steps taken, or its density fell by more than ``min_density_drop`` over
    that tail (``history``: the ``(step, val_acc, density)`` evaluations).

    Why: the search keeps the best validation checkpoint, so a search cut off while it was
    still getting sparser returns a mask that a longer budget would have made smaller. Such a
    mask is reported (``mask_budget_limited`` in results.csv, counts in summary.csv and the
    report), not silently taken as converged (issue 23)."""
    if stopped_early or steps <= 0:
        return False
    start = steps - max(1, math.ceil(tail * steps))
    if best_step > start:
        return True
    evals = [(int(h[0]), float(h[2])) for h in history]
    before = [d for s, d in evals if s <= start]
    after = [d for s, d in evals if s > start]
    if not before or not after:
        return False
    return after[-1] < before[-1] - min_density_drop
