"""Circuits on a researcher's own prompt pairs, under one objective.

With a model in memory (a built-in model, a ``HookedTransformer`` or a ``TransformerBridge``)
and :class:`~subroutine_circuits.objectives.PromptPairs` (clean / corrupted prompts with answer
tokens), these verbs find a subnetwork, test it against matched random subnetworks, and compare
it with activation and attribution patching, every step under the same objective
(:mod:`subroutine_circuits.objectives`: logit difference, KL to the full model, or a callable):

- :func:`find_circuit`: a unit mask (heads, neurons) trained on the objective with an L0 penalty,
  chosen on held-out pairs; removed units take their corrupted-prompt activation.
- :func:`ablate_circuit`: the circuit alone and the circuit removed, as MIB's normalised
  faithfulness ``(m(C) - m(empty)) / (m(full) - m(empty))``, beside ``n_random`` random circuits
  with as many units per layer and kind (and their removal), with one-sided permutation p-values.
- :func:`compare_circuits`: the mask (found here unless given), activation and attribution
  patching scores under the objective's metric, the faithfulness-size frontier of every ranking
  (CPR / CMD, Mueller et al. 2025), and the overlap of each patching ranking with the mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from subroutine_circuits.objectives import (
    Objective,
    PairObjective,
    PromptPairs,
    check_pairs_for,
    resolve_objective,
)

__all__ = ["CircuitComparison", "ablate_circuit", "compare_circuits", "find_circuit"]

#: fewest pairs for a held-out validation split (below it, validation reuses the training pairs)
MIN_VAL_SPLIT = 8
#: optimiser steps between validation evaluations of find_circuit's mask
EVAL_EVERY = 10
#: a full-vs-corrupted difference of the mean metric below this share of the metric's standard
#: deviation over pairs makes normalised faithfulness noise (a warning says so)
WEAK_CONTRAST = 0.05


def _pair_objective(objective: Any) -> PairObjective:
    obj = resolve_objective(objective)
    if not isinstance(obj, PairObjective):
        raise ValueError(f"objective {obj.name!r} does not run on prompt pairs")
    return obj


def _setup(model: Any, pairs: PromptPairs) -> tuple[Any, PromptPairs]:
    from subroutine_circuits.adapters import as_adapter

    adapter = as_adapter(model)
    if not isinstance(pairs, PromptPairs):
        raise ValueError(
            f"pairs must be PromptPairs (see prompt_pairs), got {type(pairs).__name__}"
        )
    check_pairs_for(adapter, pairs)
    return adapter, pairs.to(adapter.device)


def find_circuit(
    model: Any,
    pairs: PromptPairs,
    *,
    objective: str | Objective = "logit_diff",
    unit_kinds: Sequence[str] = ("head", "neuron"),
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 0.15,
    l0_weight: float = 1.0,
    target_density: float | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    progress: bool = False,
) -> Any:
    """The smallest subnetwork that keeps ``objective`` on ``pairs``: a hard-concrete unit mask
    trained with the model frozen for ``steps`` optimiser steps (L0 weight ``l0_weight``, or a
    ``target_density`` constraint), its binary mask evaluated every ``EVAL_EVERY`` steps on
    held-out pairs (``val_fraction``), and the best checkpoint kept (the highest validation
    score; within ``tolerance`` of it, the sparser). The frozen model's corrupted-prompt
    activations are recorded once per pair set (``PairObjective.prepare``), not per step.
    Returns the ``UnitMask`` in eval mode;
    ``mask.meta`` has the objective, the validation score, the steps and ``budget_limited``
    (the best step in the last 10% of the budget while the mask still got sparser: give it
    more ``steps``)."""
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.schedule import budget_limited
    from subroutine_circuits.experiment.search import train_mask_run

    adapter, pairs = _setup(model, pairs)
    obj = _pair_objective(objective)
    n_val = int(round(val_fraction * len(pairs)))
    if len(pairs) >= MIN_VAL_SPLIT and 0 < n_val < len(pairs):
        train, val = pairs.split(n_val, seed)
    else:
        warnings.warn(
            f"find_circuit: {len(pairs)} prompt pairs are too few to hold {val_fraction:.0%} "
            "out; the mask is chosen on its training pairs",
            stacklevel=2,
        )
        train, val = pairs, pairs
    cfg = MaskSearchConfig(
        kind="unit",
        unit_kinds=tuple(unit_kinds),
        steps=steps,
        eval_every=EVAL_EVERY,
        patience=0,
        batch_size=min(batch_size, len(train)),
        lr=lr,
        l0_weight=l0_weight,
        target_density=target_density,
        engine="separate",
        grid=[],
    )
    hooks = adapter.unit_map(kinds=tuple(unit_kinds)).hook_names()
    train, val = obj.prepare(adapter, train, hooks), obj.prepare(adapter, val, hooks)
    run = train_mask_run(adapter, train, cfg, {}, seed, val=val, objective=obj, progress=progress)
    mask = run.mask
    limited = budget_limited(run.steps, run.best_step, run.stopped_early, run.history,
                             cfg.min_density_drop)  # fmt: skip
    if limited:
        warnings.warn(
            f"find_circuit: the mask was still getting sparser at the end of its {steps} steps "
            "(budget-limited); pass more steps",
            stacklevel=2,
        )
    mask.meta = {
        **getattr(mask, "meta", {}),
        "objective": obj.name,
        "val_score": run.val_acc,
        "density": run.density,
        "steps": run.steps,
        "best_step": run.best_step,
        "budget_limited": bool(limited),
    }
    return mask


def _keep_of(circuit: Any, adapter: Any) -> tuple[Bool[Tensor, " n_units"], Any]:
    """The keep vector and unit map of a mask or of a boolean vector over the adapter's units."""
    if hasattr(circuit, "flat_binary"):
        return circuit.flat_binary().bool().cpu(), circuit.unit_map
    keep = torch.as_tensor(circuit, dtype=torch.bool).cpu()
    unit_map = adapter.unit_map()
    if keep.shape != (unit_map.n_units,):
        raise ValueError(f"a keep vector must be [{unit_map.n_units}], got {tuple(keep.shape)}")
    return keep, unit_map


def ablate_circuit(
    model: Any,
    circuit: Any,
    pairs: PromptPairs,
    *,
    objective: str | Objective = "logit_diff",
    n_random: int = 99,
    seed: int = 0,
) -> dict[str, Any]:
    """The circuit alone and removed (everything else / the circuit on its corrupted-prompt
    activation), against ``n_random`` random circuits with as many units per layer and kind.

    Returns ``m_full, m_empty`` (mean metric of the full model and of every unit corrupted),
    ``faithfulness`` (circuit alone) and ``removed_faithfulness`` (circuit removed), their random
    counterparts' means, and ``p_sufficient`` (share of random circuits at least as faithful,
    counting the circuit itself) and ``p_necessary`` (share whose removal hurts at least as
    much). ``circuit``: a ``UnitMask`` or a boolean keep vector over the model's units."""
    from subroutine_circuits.experiment.batched import matched_random_masks
    from subroutine_circuits.patching.circuits import PatchBatch, circuit_metrics

    adapter, pairs = _setup(model, pairs)
    obj = _pair_objective(objective)
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}")
    keep, unit_map = _keep_of(circuit, adapter)
    groups = list(unit_map.groups)
    n = keep.shape[0]
    rand = (
        matched_random_masks(unit_map, keep, n_random, seed)
        if n_random
        else torch.zeros(0, n, dtype=torch.bool)
    )
    rows = torch.cat([
        torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool),
        keep[None], ~keep[None], rand, ~rand,
    ])  # fmt: skip
    batch = PatchBatch(pairs.clean, pairs.corrupted, obj.patch_metric(adapter, pairs))
    m = circuit_metrics(adapter, batch, groups, rows, ablation="resample").double()
    m_full, m_empty = float(m[0]), float(m[1])
    span = m_full - m_empty
    if span == 0:
        raise ValueError("the corrupted prompts do not change the metric: faithfulness undefined")
    spread = float(obj.values(adapter, pairs).double().std()) if len(pairs) > 1 else 0.0
    if abs(span) < WEAK_CONTRAST * spread:
        warnings.warn(
            f"the corrupted prompts move the mean {obj.name} by {span:.3g}, less than "
            f"{WEAK_CONTRAST:.0%} of its spread over the pairs ({spread:.3g}): normalised "
            "faithfulness (and CPR / CMD) divide by that difference and are dominated by noise",
            stacklevel=2,
        )
    f = (m - m_empty) / span
    alone, removed = float(f[2]), float(f[3])
    r_alone, r_removed = f[4 : 4 + n_random], f[4 + n_random :]
    return {
        "objective": obj.name,
        "n_pairs": len(pairs),
        "n_units": n,
        "k": int(keep.sum()),
        "m_full": m_full,
        "m_empty": m_empty,
        "faithfulness": alone,
        "removed_faithfulness": removed,
        "random_faithfulness": float(r_alone.mean()) if n_random else float("nan"),
        "random_removed_faithfulness": float(r_removed.mean()) if n_random else float("nan"),
        "p_sufficient": float((1 + (r_alone >= alone).sum()) / (n_random + 1)),
        "p_necessary": float((1 + (r_removed <= removed).sum()) / (n_random + 1)),
        "n_random": n_random,
    }


@dataclass
class CircuitComparison:
    """What :func:`compare_circuits` found: the mask, each patching method's per-unit scores,
    the frontier, the ablation of the mask and one summary row per ranking."""

    objective: str
    mask: Any
    scores: dict[str, Float[Tensor, " n_units"]]
    frontier: Any
    ablation: dict[str, Any]
    summary: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> Any:
        """The summary as a pandas DataFrame (one row per ranking)."""
        import pandas as pd

        return pd.DataFrame(self.summary)

    def frontier_table(self) -> Any:
        """Every ranking's frontier (and the mask as a point) as a DataFrame, the columns of
        ``frontier.csv``."""
        import pandas as pd

        from subroutine_circuits.patching.frontier import frontier_rows

        return pd.DataFrame(frontier_rows(self.frontier))


def compare_circuits(
    model: Any,
    pairs: PromptPairs,
    *,
    objective: str | Objective = "logit_diff",
    mask: Any = None,
    methods: Sequence[str] = ("activation", "attribution"),
    fractions: Sequence[float] | None = None,
    n_random_orders: int = 3,
    n_random: int = 99,
    use_abs: bool = True,
    seed: int = 0,
    **find_options: Any,
) -> CircuitComparison:
    """A mask (found with :func:`find_circuit` and ``find_options`` unless given) and activation
    / attribution patching of the same pairs under the same objective, on one frontier.

    Patching runs on ``pairs`` (denoising: the corrupted run with one unit's clean activation);
    the frontier measures each ranking's top units at MIB's ``fractions`` with everything else on
    its corrupted activation (the mask ranks its kept units by logit first). Summary rows:
    ``method, cpr, cmd`` and, for patching methods, ``jaccard`` (top-k at the mask's size),
    ``roc_auc`` of the scores against the mask's units and ``spearman`` with the mask's logits.
    """
    from subroutine_circuits.experiment.patching import mask_unit_params
    from subroutine_circuits.patching.activation import activation_patching
    from subroutine_circuits.patching.attribution import attribution_patching
    from subroutine_circuits.patching.circuits import PatchBatch
    from subroutine_circuits.patching.compare import compare_with_mask
    from subroutine_circuits.patching.frontier import (
        MIB_FRACTIONS,
        frontier,
        mask_order,
        random_orders,
        score_order,
    )

    runners = {"activation": activation_patching, "attribution": attribution_patching}
    unknown = [m for m in methods if m not in runners]
    if unknown:
        raise ValueError(f"unknown patching methods {unknown}; choose from {list(runners)}")
    adapter, pairs = _setup(model, pairs)
    obj = _pair_objective(objective)
    if mask is None:
        mask = find_circuit(adapter, pairs, objective=obj, seed=seed, **find_options)
    elif find_options:
        raise ValueError(f"find_circuit options {sorted(find_options)} given with a mask")
    keep, unit_map = _keep_of(mask, adapter)
    groups = list(unit_map.groups)
    metric = obj.patch_metric(adapter, pairs)
    scores: dict[str, Tensor] = {}
    for method in methods:
        res = runners[method](adapter, pairs.clean, pairs.corrupted, metric, groups)
        scores[method] = res.flat().float().cpu()
    params = mask_unit_params(mask) if hasattr(mask, "parts") else keep.float()
    orders = {"mask": mask_order(keep, params)}
    orders.update({m: score_order(s, use_abs) for m, s in scores.items()})
    if n_random_orders:
        orders["random"] = random_orders(keep.shape[0], n_random_orders, seed)
    batch = PatchBatch(pairs.clean, pairs.corrupted, metric)
    fr = frontier(
        adapter, [batch], groups, orders, MIB_FRACTIONS if fractions is None else fractions,
        "resample", "logits", points={"mask": keep},
    )  # fmt: skip
    summary = []
    for name, curve in fr.curves.items():
        row: dict[str, Any] = {"method": name, "cpr": curve.cpr, "cmd": curve.cmd}
        if name in scores:
            row.update(compare_with_mask(scores[name], keep, params, use_abs))
        summary.append(row)
    abl = ablate_circuit(adapter, mask, pairs, objective=obj, n_random=n_random, seed=seed)
    return CircuitComparison(obj.name, mask, scores, fr, abl, summary)
