"""Mask search: train a binary mask over a frozen model for one subroutine's OOO problems.

The objective is 4-way cross-entropy on the subroutine's training problems plus an L0 penalty
(expected number of kept units, normalised by the number of units). A small grid of mask
hyperparameters is compared on VALIDATION problems only; the test split is never looked at here.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from subroutine_circuits.adapters.base import EncodedProblems
from subroutine_circuits.experiment.config import MaskSearchConfig


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
    adapter, cfg: MaskSearchConfig, hp: dict[str, Any], seed: int, ablation: str = "zero"
):
    """A fresh trainable mask (unit or weight) for the adapter's model with hyperparameters
    ``hp`` (the adapter says where the units / maskable weights are)."""
    from subroutine_circuits.masks import MaskConfig, UnitMask, WeightMask

    mcfg = MaskConfig(
        parametrization=cfg.parametrization,
        init=float(hp.get("init", cfg.init)),
        ablation=ablation,
        seed=seed,
    )
    if cfg.kind == "unit":
        unit_map = adapter.unit_map(kinds=cfg.unit_kinds, layers=hp.get("layers", cfg.layers))
        return UnitMask(unit_map, mcfg)
    return WeightMask(adapter.model, mcfg, adapter.weight_names(), init_std=adapter.init_std())


def train_mask(
    adapter,
    train: EncodedProblems,
    cfg: MaskSearchConfig,
    hp: dict[str, Any],
    seed: int,
    progress: bool = False,
):
    """Train one mask on ``train`` with the base model frozen; returns the mask in eval mode.

    The objective is 4-way cross-entropy of the adapter's OOO readout plus ``l0_weight`` times
    the expected number of kept units (or weights) divided by their total. With
    ``cfg.autocast = "bf16"`` the frozen model runs under bfloat16 autocast (masks, loss and
    optimiser stay float32).
    """
    from tqdm.auto import tqdm

    from subroutine_circuits.utils import autocast_context

    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = train.odd.device
    mask = make_mask(adapter, cfg, hp, seed).to(device)
    mask.train()
    params = [p for p in mask.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(hp.get("lr", cfg.lr)))
    l0_weight = float(hp.get("l0_weight", cfg.l0_weight))
    steps = int(hp.get("steps", cfg.steps))
    n_units = max(1, int(mask.flat_binary().numel()))
    n = len(train)
    order: list[int] = []
    for step in tqdm(range(steps), disable=not progress, desc="mask", leave=False):
        if len(order) < cfg.batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            order.extend(perm)
        idx = torch.tensor(order[: cfg.batch_size], device=device)
        del order[: cfg.batch_size]
        batch = train.batch(idx)
        with mask.applied(model), autocast_context(device, getattr(cfg, "autocast", "none")):
            scores = adapter.ooo_logits(batch.inputs)
        loss = F.cross_entropy(scores, batch.odd) + l0_weight * mask.penalty() / n_units
        if not torch.isfinite(loss):
            raise ValueError(f"mask training produced a non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(mask, "step_temperature") and (step + 1) % max(1, steps // 10) == 0:
            mask.step_temperature()
    mask.eval()
    return mask


def grid_points(cfg: MaskSearchConfig) -> list[dict[str, Any]]:
    """The hyperparameter points to compare (at least one: the defaults)."""
    return [dict(p) for p in cfg.grid] or [{}]


def search_mask(
    adapter,
    train: EncodedProblems,
    val: EncodedProblems,
    cfg: MaskSearchConfig,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Choose mask hyperparameters on validation data: best val accuracy, ties -> sparser.

    Returns the chosen point, a log of every point (val accuracy and density) and the mask
    trained at the chosen point (with ``seed``, so a caller can reuse it for that mask seed).
    """
    log, masks = [], []
    for hp in grid_points(cfg):
        mask = train_mask(adapter, train, cfg, hp, seed)
        masks.append(mask)
        log.append({"hp": hp, "val_acc": adapter.accuracy(val, mask), "density": mask.density()})
    best_acc = max(e["val_acc"] for e in log)
    eligible = [i for i, e in enumerate(log) if e["val_acc"] >= best_acc - cfg.tolerance]
    best = min(eligible, key=lambda i: (log[i]["density"], -log[i]["val_acc"]))
    return log[best]["hp"], log, masks[best]
