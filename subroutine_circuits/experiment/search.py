"""Mask search: train a binary mask over a frozen model for one subroutine's OOO problems.

The objective is 4-way cross-entropy on the subroutine's training problems plus an L0 penalty
(expected number of kept units, normalised by the number of units). A small grid of mask
hyperparameters is compared on VALIDATION problems only; the test split is never looked at here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from subroutine_circuits.experiment.config import MaskSearchConfig


@dataclass
class EncodedProblems:
    """OOO problems as padded token tensors, ready for batched forward passes."""

    tokens: Int[Tensor, "b 4 pos"]
    lengths: Int[Tensor, "b 4"]
    odd: Int[Tensor, " b"]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: str | torch.device) -> EncodedProblems:
        """Move all tensors to ``device``."""
        return EncodedProblems(self.tokens.to(device), self.lengths.to(device), self.odd.to(device))

    def batch(self, idx: Tensor) -> EncodedProblems:
        """The problems at ``idx``, trimmed to the longest stimulus among them."""
        lengths = self.lengths[idx]
        max_len = int(lengths.max())
        return EncodedProblems(self.tokens[idx][..., :max_len], lengths, self.odd[idx])


def encode(problems, tokenizer, device="cpu") -> EncodedProblems:
    """Encode a list of OOOProblem with the library's readout encoding."""
    from subroutine_circuits.models import encode_problems

    if len(problems) == 0:
        raise ValueError("cannot encode an empty list of problems")
    tokens, lengths, odd = encode_problems(problems, tokenizer)
    return EncodedProblems(tokens, lengths, odd).to(device)


@torch.no_grad()
def accuracy(model, data: EncodedProblems, pool: str, mask=None, batch_size: int = 256) -> float:
    """OOO accuracy of ``model`` (under ``mask`` if given) on encoded problems."""
    import contextlib

    from subroutine_circuits.models import ooo_logits

    ctx = mask.applied(model) if mask is not None else contextlib.nullcontext()
    correct = 0
    with ctx:
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)), device=data.odd.device)
            chunk = data.batch(idx)
            scores = ooo_logits(model, chunk.tokens, chunk.lengths, pool)
            correct += int((scores.argmax(-1) == chunk.odd).sum())
    return correct / len(data)


def make_mask(model, cfg: MaskSearchConfig, hp: dict[str, Any], seed: int, ablation: str = "zero"):
    """A fresh trainable mask (unit or weight) for ``model`` with hyperparameters ``hp``."""
    from subroutine_circuits.masks import MaskConfig, UnitMap, UnitMask, WeightMask

    mcfg = MaskConfig(
        parametrization=cfg.parametrization,
        init=float(hp.get("init", cfg.init)),
        ablation=ablation,
        seed=seed,
    )
    if cfg.kind == "unit":
        unit_map = UnitMap.from_model(
            model, layers=hp.get("layers", cfg.layers), kinds=cfg.unit_kinds
        )
        return UnitMask(unit_map, mcfg)
    return WeightMask(model, mcfg)


def train_mask(
    model,
    train: EncodedProblems,
    cfg: MaskSearchConfig,
    hp: dict[str, Any],
    seed: int,
    pool: str,
    progress: bool = False,
):
    """Train one mask on ``train`` with the base model frozen; returns the mask in eval mode."""
    from tqdm.auto import tqdm

    from subroutine_circuits.models import ooo_logits

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = train.tokens.device
    mask = make_mask(model, cfg, hp, seed).to(device)
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
        with mask.applied(model):
            scores = ooo_logits(model, batch.tokens, batch.lengths, pool)
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
    model,
    train: EncodedProblems,
    val: EncodedProblems,
    cfg: MaskSearchConfig,
    seed: int,
    pool: str,
) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Choose mask hyperparameters on validation data: best val accuracy, ties -> sparser.

    Returns the chosen point, a log of every point (val accuracy and density) and the mask
    trained at the chosen point (with ``seed``, so a caller can reuse it for that mask seed).
    """
    log, masks = [], []
    for hp in grid_points(cfg):
        mask = train_mask(model, train, cfg, hp, seed, pool)
        masks.append(mask)
        log.append(
            {"hp": hp, "val_acc": accuracy(model, val, pool, mask), "density": mask.density()}
        )
    best_acc = max(e["val_acc"] for e in log)
    eligible = [i for i, e in enumerate(log) if e["val_acc"] >= best_acc - cfg.tolerance]
    best = min(eligible, key=lambda i: (log[i]["density"], -log[i]["val_acc"]))
    return log[best]["hp"], log, masks[best]


def clipped_diff(target: float, other: float, chance: float = 0.25) -> float:
    """max(target, chance) - max(other, chance): the paper's chance-clipped difference."""
    if math.isnan(target) or math.isnan(other):
        return float("nan")
    return max(target, chance) - max(other, chance)
