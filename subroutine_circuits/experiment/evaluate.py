"""The ablation matrix of one subroutine mask, evaluated on TEST problems.

Conditions (rows of the matrix): the full model, the subnetwork alone (everything outside it
ablated), the subnetwork ablated (zero and mean ablation; re-initialised weights for weight masks),
and an equal-size random subnetwork ablated. Columns: the target partition (only this subroutine's
predicate breaks the rule), the other partition, and the subroutine's own problems.
"""

from __future__ import annotations

from typing import Any

from subroutine_circuits.adapters.base import EncodedProblems
from subroutine_circuits.utils import clipped_diff


def fixed_variants(mask, seed: int) -> dict[str, Any]:
    """Fixed (non-trainable) masks for each condition, derived from a trained ``mask``.

    Keys: ``sub`` (keep only the subnetwork), ``abl`` (keep all but the subnetwork, zero
    ablation), ``ablmean`` (same, mean ablation; unit masks), ``ablreinit`` (weight masks:
    masked-out weights replaced by re-initialised ones) and ``randabl`` (an equal-size random
    subnetwork ablated).
    """
    from subroutine_circuits.masks import UnitMask

    keep = mask.flat_binary().bool()
    out: dict[str, Any] = {}
    if isinstance(mask, UnitMask):
        um = mask.unit_map
        out["sub"] = UnitMask.fixed(um, keep, ablation="zero")
        out["abl"] = UnitMask.fixed(um, ~keep, ablation="zero")
        out["ablmean"] = UnitMask.fixed(um, ~keep, ablation="mean")
        rand = UnitMask.random_like(out["sub"], seed=seed)
        out["randabl"] = UnitMask.fixed(um, ~rand.flat_binary().bool(), ablation="zero")
    else:
        out["sub"] = mask.fixed_like(keep)
        out["abl"] = mask.fixed_like(~keep)
        out["ablreinit"] = mask.fixed_like(~keep, ablation="reinit", seed=seed)
        rand = mask.random_like(seed=seed)
        out["randabl"] = mask.fixed_like(~rand.flat_binary().bool())
    return out


def ablation_matrix(
    adapter,
    mask,
    test: dict[str, EncodedProblems],
    subroutine: str,
    other: str,
    seed: int,
    reference: EncodedProblems | None = None,
    chance: float = 0.25,
    margin: float = 0.05,
    ablation: str = "zero",
) -> dict[str, Any]:
    """Evaluate every condition on the target/other partitions; returns one results row (dict).

    ``adapter`` wraps the frozen base model (``adapters.as_adapter``); ``mask`` is the trained
    subroutine mask (unit or weight). ``test`` maps problem kinds (``partition_<p>``,
    ``sub_<p>``) to encoded test problems;
    ``reference`` supplies the stimuli whose mean activations define mean ablation.
    ``ablation`` ("zero" or "mean") picks the ablated condition reported as ``abl_*`` and used
    for ``abl_diff`` and the verdict; both are always reported as ``ablzero_*`` / ``ablmean_*``.
    """
    target_kind, other_kind = f"partition_{subroutine}", f"partition_{other}"
    for kind in (target_kind, other_kind, f"sub_{subroutine}"):
        if kind not in test or len(test[kind]) == 0:
            raise ValueError(f"test split has no {kind!r} problems")
    variants = fixed_variants(mask, seed)
    if "ablmean" in variants:
        ref = reference if reference is not None else test[f"sub_{subroutine}"]
        variants["ablmean"].set_mean(adapter, ref.flat_inputs())
    row: dict[str, Any] = {}
    for name, m in variants.items():
        row[f"{name}_target_acc"] = adapter.accuracy(test[target_kind], m)
        row[f"{name}_other_acc"] = adapter.accuracy(test[other_kind], m)
    for col in ("target", "other"):
        row[f"ablzero_{col}_acc"] = row[f"abl_{col}_acc"]
        if ablation == "mean" and f"ablmean_{col}_acc" in row:
            row[f"abl_{col}_acc"] = row[f"ablmean_{col}_acc"]
    row["sub_sub_acc"] = adapter.accuracy(test[f"sub_{subroutine}"], variants["sub"])
    row["sub_diff"] = clipped_diff(row["sub_target_acc"], row["sub_other_acc"], chance)
    row["abl_diff"] = clipped_diff(row["abl_target_acc"], row["abl_other_acc"], chance)
    row["randabl_diff"] = clipped_diff(row["randabl_target_acc"], row["randabl_other_acc"], chance)
    row["compositional"] = bool(row["sub_diff"] > margin and row["abl_diff"] < -margin)
    row["density"] = float(mask.density())
    row["n_kept"] = int(mask.flat_binary().sum())
    return row
