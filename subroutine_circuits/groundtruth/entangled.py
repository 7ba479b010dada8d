"""Entangled planted models: both subroutines computed by the same units, checked exhaustively.

Trained models split the two subroutines into different units on their own (measured: parts
trained on composite + ``sub_A`` + ``sub_B`` problems, pruned to 2-11 units, always had a subset
of units whose ablation broke one partition and spared the other by 0.3-0.65 accuracy). So
entanglement is trained in and then *checked*, and a model that fails the check is redrawn:

1. a part is trained on composite + ``sub_A`` + ``sub_B`` problems and pruned (as in
   :func:`planted._train_part`);
2. it is fine-tuned with an anti-selectivity penalty: each step drops a random subset of units
   (zero ablation; each unit with probability ``p``, ``p`` drawn from ``[0, entangled_drop)``,
   so subsets of every size occur) and adds ``weight * (CE_A - CE_B)^2``, the squared
   difference of the cross-entropies on the two target partitions under that ablation, to the
   task loss;
3. the check, with the experiment's ablation (:mod:`truth`): (a) every unit, ablated alone,
   raises the loss on ``sub_A`` *and* on ``sub_B`` validation problems by at least
   ``prune_min_effect`` nats; (b) *every* non-empty subset S of the units, ablated, has
   selectivity ``|max(acc_A, chance) - max(acc_B, chance)| <= entangled_margin`` on the
   validation target partitions (``2**n - 1`` subsets, ``n <= entangled_max_units``).

Ground truth, stated precisely: the subnetwork of A and the subnetwork of B are the same set, all
live units of the model; no set of units, ablated, separates A from B by more than the margin on
validation problems, so no mask can pass the verdict's ablation test (``abl_diff < -margin``)
except through the difference between validation and test problems. Expected verdict: "not
compositional". (A ROC AUC is undefined: every unit is planted for both subroutines.)

Status (measured, agreement_singular, default part size): no draw has passed yet. Without the
penalty the most selective subset separated the partitions by 0.44-0.63; with it (600 steps,
weight 5) by 0.15-0.53, and one draw came within 0.005 nats of the per-unit criterion. So
``validate`` leaves this kind out by default (``--kinds ... entangled`` runs it; a seed none of
whose draws passes yields a "not built" row, never a verdict).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from subroutine_circuits.groundtruth.prune import HOOKS, Encoded, Unit, all_units
from subroutine_circuits.models.loop import BaseTrainer


class EntangledBuildError(ValueError):
    """No drawn part passed the entanglement check."""


def _drop_hooks(model: Any, drop: set[Unit]) -> list[tuple[str, Any]]:
    """Zero-ablation hooks (differentiable w.r.t. the weights) for the units in ``drop``."""
    by_hook: dict[str, list[int]] = {}
    for layer, kind, idx in drop:
        by_hook.setdefault(HOOKS[kind].format(layer=layer), []).append(idx)
    hooks = []
    for name, idx in by_hook.items():

        def fn(x, hook, idx=tuple(idx)):
            m = torch.ones(x.shape[2], device=x.device, dtype=x.dtype)
            m[list(idx)] = 0.0
            return x * m.view(1, 1, -1, *([1] * (x.dim() - 3)))

        hooks.append((name, fn))
    return hooks


class _PenaltyTrainer(BaseTrainer):
    """The anti-selectivity fine-tuning (module docstring, step 2) on the one base-model loop:
    Adam over every weight, ``cfg.entangled_steps`` steps; each step draws a batch of 32 mixed
    problems and one of each target partition, and a random set of units to drop."""

    desc = "entangled fine-tuning"

    def __init__(self, part: Any, data: dict[str, Any], units: list[Unit], cfg: Any,
                 seed: int) -> None:  # fmt: skip
        for p in part.parameters():
            p.requires_grad_(True)
        optim = torch.optim.Adam(part.parameters(), lr=cfg.entangled_lr)
        super().__init__(part, optim, cfg.entangled_steps,
                         advice=f"PlantedConfig.entangled_lr (now {cfg.entangled_lr})")  # fmt: skip
        self.data, self.units, self.cfg = data, units, cfg
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.last: dict[str, float] = {}

    def _draw(self, name: str, bs: int = 32) -> tuple[Tensor, Tensor, Tensor]:
        d = self.data[name]
        idx = torch.randint(0, d.tokens.shape[0], (bs,), generator=self.gen)
        return d.tokens[idx], d.lengths[idx], d.odd[idx]

    def batches(self) -> Iterator[None]:
        """Nothing: each step draws its own batches (:meth:`loss`)."""
        return itertools.repeat(None)

    def loss(self, batch: None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Task loss on mixed problems plus the weighted squared difference of the partitions'
        cross-entropies with a random set of units dropped."""
        from subroutine_circuits.models import ooo_logits

        part, cfg, rng = self.model, self.cfg, self.rng
        tok, ln, odd = self._draw("mix")
        loss = F.cross_entropy(ooo_logits(part, tok, ln), odd)
        p_drop = rng.uniform(0.0, cfg.entangled_drop)  # subsets of every size
        drop = {u for u in self.units if rng.random() < p_drop} or {rng.choice(self.units)}
        ce = {}
        with part.hooks(fwd_hooks=_drop_hooks(part, drop)):
            for name in ("A", "B"):
                tok, ln, odd = self._draw(name)
                ce[name] = F.cross_entropy(ooo_logits(part, tok, ln), odd)
        penalty = (ce["A"] - ce["B"]) ** 2
        return loss + cfg.entangled_weight * penalty, (loss, penalty)

    def after_step(
        self, batch: Any, loss: float, info: Any, bar: Any, last: bool, over_time: bool
    ) -> str | None:
        """Keep the last step's task loss and penalty."""
        self.last = {"task_loss": float(info[0].detach()), "penalty": float(info[1].detach())}
        return None


def disentangle_penalty_finetune(
    part: Any, tokenizer: Any, splits: dict, predicates: tuple[str, str], cfg: Any, seed: int,
    units: Any = None,
) -> dict[str, float]:  # fmt: skip
    """Fine-tune ``part`` in place with the anti-selectivity penalty (module docstring, step 2)
    over its live ``units`` (default: every unit); returns the last step's task loss and
    penalty. The weights are frozen again afterwards."""
    pa, pb = predicates
    mix = [*splits["train"]["composite"], *splits["train"][f"sub_{pa}"],
           *splits["train"][f"sub_{pb}"]]  # fmt: skip
    data = {
        "mix": Encoded.of(mix, tokenizer),
        "A": Encoded.of(splits["train"][f"partition_{pa}"], tokenizer),
        "B": Encoded.of(splits["train"][f"partition_{pb}"], tokenizer),
    }
    units = sorted(units) if units is not None else all_units(part)
    trainer = _PenaltyTrainer(part, data, units, cfg, seed)
    trainer.run()
    for p in part.parameters():
        p.requires_grad_(False)
    return trainer.last


def entanglement_check(
    part: Any, tokenizer: Any, splits: dict, predicates: tuple[str, str], cfg: Any,
    ablation: str, units: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """The check of the module docstring (step 3) under ``ablation`` over the live ``units``
    (default: every unit; compaction's all-zero padding slots should be left out); ``passed``
    says it all."""
    from subroutine_circuits.groundtruth.truth import (
        AblationEvaluator,
        subset_selectivity,
        unit_necessity,
    )

    pa, pb = predicates
    ref = splits["train"]["composite"][: cfg.fit_problems]
    ev = AblationEvaluator(part, tokenizer, ablation, ref)
    units = sorted(units) if units is not None else all_units(part)
    out: dict[str, Any] = {"ablation": ablation, "n_units": len(units)}
    nec = {p: unit_necessity(ev, splits["val"][f"sub_{p}"], units) for p in (pa, pb)}
    out["min_loss_necessity"] = {p: min((v[1] for v in nec[p].values()), default=0.0)
                                 for p in (pa, pb)}  # fmt: skip
    out["per_unit_ok"] = all(v >= cfg.prune_min_effect for v in out["min_loss_necessity"].values())
    if len(units) > cfg.entangled_max_units or not units:
        out.update(passed=False, reason=f"{len(units)} units (max {cfg.entangled_max_units})")
        return out
    parts = {p: splits["val"][f"partition_{p}"] for p in (pa, pb)}
    sel = subset_selectivity(ev, parts, units, max_units=cfg.entangled_max_units)
    out.update({k: v for k, v in sel.items() if k.startswith(("max_", "n_"))})
    worst = max(sel[f"max_selectivity_{pa}"], sel[f"max_selectivity_{pb}"])
    out["subsets_ok"] = worst <= cfg.entangled_margin
    out["passed"] = bool(out["per_unit_ok"] and out["subsets_ok"])
    return out
