"""Check a planted truth under the experiment's own ablation (zero or position-aware mean).

The planted units are found by pruning with zero ablation (``prune``), because pruned units are
then removed from the architecture (their activations are exactly zero, so every ablation of them
is the same). What the experiment does with the *remaining* units depends on its ablation: with
mean ablation a unit is replaced by its mean over a reference set, which can make a nearly
constant unit unnecessary. So every planted claim that involves ablating a live unit is checked
here with the experiment's ablation too (``PlantedModel.metrics["truth_check"]``):

* per planted unit: the increase of the mean cross-entropy on its subroutine's problems when
  that unit alone is ablated (``unit_necessity``);
* for entangled models: the selectivity of ablating any subset of units (``max_selectivity``).

Mean ablation uses the same reference as the experiment: training *composite* problems (one
balanced set shared by both subroutines), position-aware (the readout position gets the mean over
readout positions, every other position the mean over the other real positions).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from subroutine_circuits.groundtruth.prune import Encoded, Unit, evaluate_ablations
from subroutine_circuits.masks.ablation import mix

ABLATIONS = ("zero", "mean")


class AblationEvaluator:
    """Accuracy and loss of a model under "ablate exactly these units" configurations.

    ``ablation``: ``"zero"`` (batched, :func:`prune.evaluate_ablations`) or ``"mean"``
    (position-aware means over ``reference`` problems, through ``masks.UnitMask``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        ablation: str = "mean",
        reference: Sequence[Any] | None = None,
        pool: str | None = None,
    ):
        from subroutine_circuits.adapters import as_adapter
        from subroutine_circuits.masks import UnitMask

        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        self.model, self.tokenizer, self.ablation, self.pool = model, tokenizer, ablation, pool
        self.adapter = as_adapter(model, tokenizer=tokenizer, pool=pool)
        self.unit_map = self.adapter.unit_map(kinds=("head", "neuron"))
        self.index = {u: i for i, u in enumerate(self.unit_map.units())}
        self.base = UnitMask.fixed(
            self.unit_map, torch.ones(self.unit_map.n_units, dtype=torch.bool), ablation
        )
        if ablation == "mean":
            if not reference:
                raise ValueError("mean ablation needs reference problems (training composite)")
            ref = self.adapter.encode_problems(list(reference)).to(self.adapter.device)
            self.base.set_mean(self.adapter, ref.flat_inputs(), position_aware=True)

    def keep_vector(self, ablate: Iterable[Unit]) -> torch.Tensor:
        """Boolean keep vector over the unit map with ``ablate`` off."""
        keep = torch.ones(self.unit_map.n_units, dtype=torch.bool)
        for u in ablate:
            if tuple(u) not in self.index:
                raise ValueError(f"unit {u} is not a head or neuron of this model")
            keep[self.index[tuple(u)]] = False
        return keep

    @torch.no_grad()
    def evaluate(
        self, problems: Sequence[Any], configs: Sequence[Iterable[Unit]], max_rows: int = 4096
    ) -> tuple[list[float], list[float]]:
        """``(accuracies, mean cross-entropies)`` of each config (a set of units to ablate).

        Several configs share one forward pass (problems repeated once per config, at most
        ``max_rows`` problems per pass), as in :func:`prune.evaluate_ablations`."""
        from subroutine_circuits.models import ooo_logits

        configs = [set(c) for c in configs]
        if self.ablation == "zero":
            data = Encoded.of(problems, self.tokenizer)
            return evaluate_ablations(self.model, data, configs, self.pool, max_rows)
        data = Encoded.of(problems, self.tokenizer)
        n = data.tokens.shape[0]
        accs: list[float] = []
        losses: list[float] = []
        per_pass = max(1, max_rows // n)
        for start in range(0, len(configs), per_pass):
            chunk = configs[start : start + per_pass]
            c = len(chunk)
            keep = torch.stack([self.keep_vector(cf) for cf in chunk])  # [c, n_units]
            lengths = data.lengths.repeat(c, 1)
            width = int(lengths.max())
            ro = torch.arange(width)[None, :] == (lengths.reshape(-1, 1) - 1)  # [rows, pos]
            hooks = [(g.hook_name, self._hook(g, keep[:, sl], ro, c))
                     for g, sl in zip(self.unit_map.groups, self._slices())]  # fmt: skip
            with self.model.hooks(fwd_hooks=hooks):
                logits = ooo_logits(self.model, data.tokens.repeat(c, 1, 1), lengths, self.pool)
            odd = data.odd.repeat(c)
            accs.extend((logits.argmax(-1) == odd).view(c, n).float().mean(1).tolist())
            ce = F.cross_entropy(logits.float(), odd, reduction="none")
            losses.extend(ce.view(c, n).mean(1).tolist())
        return accs, losses

    def _slices(self) -> list[slice]:
        return [slice(o, o + g.size) for o, g in zip(self.unit_map.offsets(), self.unit_map.groups)]

    def _hook(self, group: Any, keep: Tensor, ro: Tensor, c: int):
        """Hook for one unit group: config ``i``'s copy keeps ``keep[i]``, the rest gets the
        position-aware mean (readout positions ``ro``: the readout mean)."""
        a = self.base.ablation_values[group.hook_name]
        a_ro = self.base.readout_values.get(group.hook_name, a)

        def fn(x: Tensor, hook: Any = None) -> Tensor:
            # x: [c*n*4, pos, head, d_head] (hook_z) or [c*n*4, pos, d_mlp] (hook_post)
            extra = [1] * (x.dim() - 3)
            k = keep.to(x.device).repeat_interleave(x.shape[0] // c, 0)  # [rows, units]
            k = k.view(x.shape[0], 1, k.shape[1], *extra)
            sel = ro[:, : x.shape[1]].to(x.device).view(x.shape[0], x.shape[1], 1, *extra)
            value = torch.where(sel, a_ro.to(x.device, x.dtype), a.to(x.device, x.dtype))
            return mix(x, k, value)  # the one ablation formula (masks.ablation)

        return fn


def unit_necessity(
    ev: AblationEvaluator, problems: Sequence[Any], units: Sequence[Unit]
) -> dict[Unit, tuple[float, float]]:
    """Per unit: ``(accuracy drop, loss increase)`` on ``problems`` when it alone is ablated."""
    units = list(units)
    accs, losses = ev.evaluate(problems, [set(), *({u} for u in units)])
    return {u: (accs[0] - a, loss - losses[0]) for u, a, loss in zip(units, accs[1:], losses[1:])}


def subset_selectivity(
    ev: AblationEvaluator,
    partitions: Mapping[str, Sequence[Any]],
    units: Sequence[Unit],
    chance: float = 0.25,
    max_units: int = 12,
) -> dict[str, Any]:
    """Ablate every non-empty subset of ``units``; the most selective one for each partition.

    ``partitions``: exactly two problem lists (target partitions of A and of B). For a subset S,
    ``sel_A(S) = clipped(acc_B) - clipped(acc_A)`` (positive when ablating S breaks A more than
    B; ``clipped(x) = max(x, chance)``, as in the verdict's ``abl_diff``). Returns the largest
    ``sel_A`` and ``sel_B`` and their subsets. Raises ``ValueError`` for more than ``max_units``
    units (``2**n`` configurations).
    """
    units = list(units)
    if len(units) > max_units:
        raise ValueError(
            f"{len(units)} units: 2**{len(units)} subsets exceed max_units={max_units}"
        )
    if len(partitions) != 2:
        raise ValueError("partitions must hold exactly two problem lists (A, B)")
    subsets = [set(s) for r in range(1, len(units) + 1) for s in itertools.combinations(units, r)]
    (na, pa), (nb, pb) = partitions.items()
    acc_a, _ = ev.evaluate(pa, subsets)
    acc_b, _ = ev.evaluate(pb, subsets)
    sel_a = [max(b, chance) - max(a, chance) for a, b in zip(acc_a, acc_b)]
    ia = max(range(len(subsets)), key=lambda i: sel_a[i])
    ib = min(range(len(subsets)), key=lambda i: sel_a[i])
    return {
        f"max_selectivity_{na}": sel_a[ia],
        f"max_selectivity_{nb}": -sel_a[ib],
        f"most_selective_{na}": sorted(subsets[ia]),
        f"most_selective_{nb}": sorted(subsets[ib]),
        "n_subsets": len(subsets),
    }


def truth_check(planted: Any, cfg: Any) -> dict[str, Any]:
    """Each planted unit's necessity under the experiment's ablation and under zero ablation.

    For every part of ``planted.parts`` (a block that computes some subroutines), every unit
    outside the part is ablated (so that, as when the part was pruned, only the part computes),
    and then each of the part's units is ablated on top: the increase of the mean cross-entropy
    on the validation ``sub_<p>`` problems of each subroutine ``p`` the part computes. The truth
    holds under an ablation when every such increase is at least ``cfg.prune_min_effect``
    (``ok``). Returns ``{ablation: {"min_loss_necessity", "n_below", "n_checked", "ok"}}``.
    """
    from subroutine_circuits.groundtruth.prune import all_units

    if not planted.parts:
        return {}
    every = set(all_units(planted.model))
    live = set().union(*(p["units"] for p in planted.parts.values()))
    ref = planted.splits["train"]["composite"][: cfg.fit_problems]
    out: dict[str, Any] = {}
    for ablation in dict.fromkeys((cfg.ablation, "zero")):
        ev = AblationEvaluator(planted.model, planted.tokenizer, ablation, ref)
        effects: list[float] = []
        for part in planted.parts.values():
            rest = (live - part["units"]) | (every - live)
            units = sorted(part["units"])
            for p in part["computes"]:
                _, losses = ev.evaluate(
                    planted.splits["val"][f"sub_{p}"], [rest, *(rest | {u} for u in units)]
                )
                effects += [loss - losses[0] for loss in losses[1:]]
        n_below = sum(e < cfg.prune_min_effect for e in effects)
        out[ablation] = {
            "min_loss_necessity": min(effects, default=float("nan")),
            "n_below": int(n_below),
            "n_checked": len(effects),
            "ok": n_below == 0,
        }
    return out


def minimal_subnetworks(
    ev: AblationEvaluator,
    units: Iterable[Unit],
    every: set[Unit],
    sub_problems: Sequence[Any],
    partition_problems: Sequence[Any],
    min_acc: float,
    tol: float,
) -> dict[str, Any]:
    """Every minimal sufficient subnetwork among ``units`` and what ablating it costs.

    Each subset ``S`` of ``units`` is kept alone (every other unit of ``every`` ablated) on
    ``sub_problems``. ``S`` is *sufficient* when its accuracy is at least ``min_acc`` (the mask
    search's success threshold) and *minimal* when the mask search's minimality pass
    (``experiment.search.prune_run``, tolerance ``tol``) can end in ``S``. That pass removes a
    unit while the accuracy stays at or above ``floor = max(start - tol, min_acc)``, where
    ``start`` (the accuracy of the mask it started from) is at least ``acc(S)`` and at most 1,
    and stops when no single removal does; so it can end in a sufficient ``S`` exactly when
    some such floor lies above every ``acc(S - u)``: when every ``acc(S - u)`` is below
    ``min(acc(S), max(1 - tol, min_acc))``. For each minimal ``S``: the accuracy drop on
    ``partition_problems`` when ``S`` is ablated (the rest of the model kept). Exhaustive:
    ``2 ** len(units)`` evaluations.
    """
    units = sorted(tuple(u) for u in units)
    subsets = [
        frozenset(c) for r in range(len(units) + 1) for c in itertools.combinations(units, r)
    ]
    accs, _ = ev.evaluate(sub_problems, [every - s for s in subsets])
    acc = dict(zip(subsets, accs))
    sufficient = {s for s in subsets if acc[s] >= min_acc - 1e-9}
    top = max(1.0 - tol, min_acc)
    minimal = [
        s for s in subsets
        if s in sufficient and all(acc[s - {u}] < min(acc[s], top) - 1e-9 for u in s)
    ]  # fmt: skip
    part_accs, _ = ev.evaluate(partition_problems, [set(), *minimal])
    drops = [part_accs[0] - a for a in part_accs[1:]]
    return {
        "n_subsets": len(subsets),
        "n_sufficient": len(sufficient),
        "minimal": [{"units": sorted(s), "partition_drop": d} for s, d in zip(minimal, drops)],
        "max_drop": max(drops, default=float("nan")),
    }


def redundancy_check(planted: Any, cfg: Any) -> dict[str, Any]:
    """What makes a redundant model redundant, measured: no sufficient subnetwork is necessary.

    For each subroutine ``p`` and under the experiment's ablation and zero ablation, on the
    validation problems:

    * ``partitions``: each partition's accuracy with one copy of ``planted.parts`` (``A1``,
      ``A2``, ``B1``, ``B2``) ablated; ``max_drop`` is the largest drop from the whole model's;
    * ``alone``: the accuracy on ``sub_<p>`` with *only* that copy kept (every other unit
      ablated);
    * ``minimal[p]`` (:func:`minimal_subnetworks` over the units of both copies of ``p``): every
      minimal sufficient subnetwork (kept alone, it reaches ``cfg.sufficient_acc`` on
      ``sub_<p>``; no unit of it can go within ``cfg.minimal_tol``) and the drop of
      ``partition_<p>`` when it is ablated.
      A mixture of both copies can be such a subnetwork (copies add up at the readout), and then
      ablating it breaks the partition: that model is not redundant in this sense.

    ``ok`` under an ablation: no copy's ablation and no minimal sufficient subnetwork's ablation
    lowers its partition by more than ``cfg.redundant_max_drop``, and each copy alone reaches
    ``cfg.sufficient_acc``. Then whatever minimal subnetwork a mask search finds, its removal
    cannot break its partition. The subsets are enumerated exhaustively, so a subroutine with
    more than ``cfg.redundant_max_units`` units is not checked (``ok`` False). Returns ``{}`` for
    other kinds.
    """
    from subroutine_circuits.groundtruth.prune import all_units

    if planted.kind != "redundant" or not planted.parts:
        return {}
    every = set(all_units(planted.model))
    names = list(planted.parts)
    copies = [planted.parts[n]["units"] for n in names]
    ref = planted.splits["train"]["composite"][: cfg.fit_problems]
    val = planted.splits["val"]
    out: dict[str, Any] = {}
    for ablation in dict.fromkeys((cfg.ablation, "zero")):
        ev = AblationEvaluator(planted.model, planted.tokenizer, ablation, ref)
        partitions, worst = {}, 0.0
        for p in planted.subroutines:
            accs, _ = ev.evaluate(val[f"partition_{p}"], [set(), *copies])
            without = {f"without_{n}": a for n, a in zip(names, accs[1:])}
            partitions[p] = {"full": accs[0], **without}
            worst = max(worst, *(accs[0] - a for a in accs[1:]))
        alone = {}
        for n, units in zip(names, copies):
            for p in planted.parts[n]["computes"]:
                (acc,), _ = ev.evaluate(val[f"sub_{p}"], [every - units])
                alone[f"{n}_sub_{p}"] = acc
        minimal: dict[str, Any] = {}
        for p in planted.subroutines:
            units = set().union(*(c for n, c in zip(names, copies)
                                  if p in planted.parts[n]["computes"]))  # fmt: skip
            if len(units) > cfg.redundant_max_units:
                minimal[p] = {"checked": False, "n_units": len(units)}
                continue
            minimal[p] = {"checked": True, **minimal_subnetworks(
                ev, units, every, val[f"sub_{p}"], val[f"partition_{p}"], cfg.sufficient_acc,
                cfg.minimal_tol,
            )}  # fmt: skip
        minimal_ok = all(
            m["checked"] and not m["max_drop"] > cfg.redundant_max_drop for m in minimal.values()
        )
        out[ablation] = {
            "max_drop": worst,
            "partitions": partitions,
            "alone": alone,
            "minimal": minimal,
            "ok": worst <= cfg.redundant_max_drop
            and minimal_ok
            and all(a >= cfg.sufficient_acc - 1e-9 for a in alone.values()),
        }
    return out
