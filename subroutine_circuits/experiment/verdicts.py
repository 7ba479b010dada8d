"""The mask stage of one base model, and the checks that decide whether its runs can be trusted.

Per base model, in order:

1. **Reference ablation** (:func:`reference_ablators`): the experiment's one ablation (and the
   two robustness ones) from ONE balanced reference set, the training composite problems,
   shared by both subroutines and every condition.
2. **Bypass check** (:func:`bypass_check`): with every maskable unit ablated, accuracy on the
   validation composite problems and on both validation partitions must lie within
   ``bypass_tolerance`` of chance. Otherwise information reaches the readout around the masks
   (e.g. a word's own embedding through the residual stream), no mask can remove a subroutine,
   and the base model is kept out of verdicts (``bypass`` true, with the path named).
3. **Masks** (:func:`run_masks_stage`): every (subroutine, grid point, mask seed) trained to
   convergence (one batched loop for unit masks), a grid point chosen per subroutine on
   validation data, then the ablation matrix and matched random controls on test problems.
4. **Verdict** per run (:func:`~subroutine_circuits.analysis.inference.run_verdict`), in
   this order: "excluded" (base model fails its VALIDATION composite accuracy, or bypass),
   "search failed" (``mask_val_acc`` or, on the test ``sub_<p>`` problems the search never
   saw, ``sub_sub_acc`` below ``mask_min_acc``), "residual path" (a successful mask of fewer
   than ``min_mask_units`` units), "not compositional" when a margin fails
   (not ``sub_diff > margin`` and ``abl_diff < -margin``, whatever ``randabl_p``), "no random
   control" (margins pass, ``randabl_p`` NaN), "compositional" (``randabl_p <= 0.05``) or
   "not compositional". Beside it the row gets ``margins_ok`` and ``paper_compositional``
   (the paper's criterion: usable base model, ``mask_ok`` and the margins, no random control;
   :func:`~subroutine_circuits.analysis.inference.verdict_columns`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from subroutine_circuits.masks.ablator import (
    ABLATIONS,
    Ablator,
    reference_ablator,
    supported_ablations,
)

#: Where information escapes the masks, by readout (for the bypass message).
BYPASS_PATHS = {
    "last": "the readout position's own token and position embeddings reach ln_final through "
    "the residual stream without passing any head or neuron",
    "mean": "mean pooling reads every word's own embedding through the residual stream",
}


def reference_ablators(
    adapter, cfg, reference, seed: int, kinds: tuple[str, ...] = ABLATIONS
) -> dict[str, Ablator]:
    """Ablators of ``kinds`` over the unit map of ``cfg.mask`` from ``reference`` problems
    (EncodedProblems; their stimuli are the reference set). Kinds the inputs do not support
    (:func:`supported_ablations`: resample for images) are left out, so their robustness
    columns are absent; ``cfg.ablation`` itself must be supported (ValueError otherwise)."""
    um = adapter.unit_map(kinds=cfg.mask.unit_kinds, layers=cfg.mask.layers)
    flat = reference.flat_inputs()
    ok = supported_ablations(flat, kinds)
    if cfg.ablation in kinds and cfg.ablation not in ok:
        raise ValueError(
            f"ablation = {cfg.ablation!r} needs token inputs (tokens and lengths); these inputs "
            f"({sorted(flat)}) support {list(supported_ablations(flat))}"
        )
    return {k: reference_ablator(adapter, um, flat, k, seed=seed) for k in ok}


def _all_ablated_accuracy(adapter, cfg, data, ablator: Ablator | None) -> float:
    """Accuracy on ``data`` with every maskable unit (or weight) ablated."""
    if cfg.mask.kind == "weight":
        from subroutine_circuits.masks import WeightMask

        names = adapter.weight_names()
        n = sum(int(dict(adapter.model.named_parameters())[k].numel()) for k in names)
        none = WeightMask.fixed(adapter.model, torch.zeros(n, dtype=torch.bool), names)
        return adapter.accuracy(data, none)
    from subroutine_circuits.experiment.evaluate import fixed_accuracies

    if ablator is None:
        raise ValueError(f"no {cfg.ablation!r} ablator for the bypass check")
    um = adapter.unit_map(kinds=cfg.mask.unit_kinds, layers=cfg.mask.layers)
    keep = torch.zeros(1, um.n_units, dtype=torch.bool)
    return fixed_accuracies(adapter, data, keep, um, ablator)[0]


def bypass_check(adapter, cfg, val: dict[str, Any], subroutines: list[str], ablator) -> dict:
    """Accuracies on validation composite/partition problems with everything ablated.

    Returns ``{"accuracies": {kind: acc}, "bypass": bool, "path": str | None,
    "ablation": kind}``; ``bypass`` when any accuracy is farther than ``cfg.bypass_tolerance``
    from chance.
    """
    kinds = ["composite", *[f"partition_{s}" for s in subroutines]]
    accs = {k: _all_ablated_accuracy(adapter, cfg, val[k], ablator) for k in kinds if k in val}
    far = {k: a for k, a in accs.items() if abs(a - cfg.chance) > cfg.bypass_tolerance}
    path = None
    if far:
        what = "weight" if cfg.mask.kind == "weight" else "unit"
        worst = ", ".join(f"{k} {a:.2f}" for k, a in far.items())
        where = BYPASS_PATHS.get(getattr(adapter, "pool", None), "a path around the masks")
        path = (
            f"with every maskable {what} ablated, accuracy stays away from chance "
            f"({cfg.chance}) on {worst}: {where}"
        )
    return {"accuracies": accs, "bypass": bool(far), "path": path, **bypass_setting(cfg)}


def bypass_setting(cfg) -> dict[str, Any]:
    """What the bypass check depends on besides the model (a stored check is reused only when
    these agree)."""
    m = cfg.mask
    return {
        "ablation": "zero" if m.kind == "weight" else cfg.ablation,
        "mask_kind": m.kind,
        "unit_kinds": list(m.unit_kinds) if m.kind == "unit" else None,
        "layers": None if m.layers is None else list(m.layers),
        "tolerance": cfg.bypass_tolerance,
    }


# ---------------------------------------------------------------------------- the mask stage
def _usable(base, run, cfg) -> bool:
    """Whether a run can be compositional at all (random controls are drawn only then)."""
    return bool(base.base_ok and not base.bypass and run.val_acc >= cfg.mask_min_acc)


def _evaluate(base, cfg, runs_by_key, others, base_seed: int) -> dict[str, dict[str, Any]]:
    """Ablation-matrix rows of every run to write (``{run key: row}``)."""
    from subroutine_circuits.experiment.evaluate import (
        RunToEvaluate,
        evaluate_unit_runs,
        evaluate_weight_runs,
    )

    keys = list(runs_by_key)
    subs = list(others)
    todo = [
        RunToEvaluate(
            ev.subroutine,
            ev.other,
            ev.mask_seed,
            run.mask,
            _usable(base, run, cfg),
            draw_seed=104_729 * base_seed + 7_919 * subs.index(ev.subroutine) + ev.mask_seed,
            min_sub_acc=cfg.mask_min_acc,
        )
        for ev, run in runs_by_key.values()
    ]
    test = base.enc["test"]
    margin = cfg.margin if cfg.random_controls == "candidates" else None
    if cfg.mask.kind == "unit":
        # runs over different unit maps (grid points masking other layers) are grouped there
        rows = evaluate_unit_runs(
            base.adapter,
            todo,
            test,
            base.ablators,
            cfg.ablation,
            cfg.n_random,
            cfg.chance,
            margin,
            shortcuts=cfg.random_shortcuts,
        )
    else:
        rows = evaluate_weight_runs(base.adapter, todo, test, cfg.n_random, cfg.chance, margin)
    return dict(zip(keys, rows))


def mask_flags(val_acc: float, test_sub_acc: Any, n_kept: Any, cfg) -> dict[str, bool]:
    """``mask_val_ok`` (validation accuracy on its own subroutine, where the search chose the
    mask, at least ``cfg.mask_min_acc``), ``mask_test_ok`` (the same on the test ``sub_<p>``
    problems the search never saw: ``sub_sub_acc``), ``mask_ok`` (both) and ``residual_path``
    (a successful mask of fewer than ``cfg.min_mask_units`` units,
    :func:`~subroutine_circuits.analysis.inference.is_residual_path`)."""
    from subroutine_circuits.analysis.inference import is_residual_path

    val_ok = bool(val_acc >= cfg.mask_min_acc)
    test_ok = test_sub_acc is not None and bool(float(test_sub_acc) >= cfg.mask_min_acc)
    ok = val_ok and test_ok
    return {
        "mask_ok": ok,
        "mask_val_ok": val_ok,
        "mask_test_ok": test_ok,
        "residual_path": bool(ok and is_residual_path(n_kept, cfg.min_mask_units)),
    }


def run_row(base_job, base, ev, run, hp: dict, row: dict, rel: str) -> dict[str, Any]:
    """The results.csv row of one run (columns documented in docs/RESULTS.md); its verdict
    columns come from :func:`~subroutine_circuits.analysis.inference.verdict_columns`."""
    from subroutine_circuits.analysis.inference import verdict_columns
    from subroutine_circuits.experiment.schedule import budget_limited

    cfg, meta = base_job.cfg, base.meta
    row.update(
        task=base_job.task,
        model=cfg.model.preset if not cfg.model.checkpoint else "checkpoint",
        init=base_job.init,
        base_seed=base_job.seed,
        mask_seed=ev.mask_seed,
        subroutine=ev.subroutine,
        other=ev.other,
        mask_kind=cfg.mask.kind,
        composite_acc=base.composite_acc,
        composite_val_acc=base.val_composite_acc,
        base_ok=base.base_ok,
        bypass=base.bypass,
        full_target_acc=meta["full"][f"partition_{ev.subroutine}"],
        full_other_acc=meta["full"][f"partition_{ev.other}"],
        full_sub_acc=meta["full"][f"sub_{ev.subroutine}"],
        mask_val_acc=run.val_acc,
        **mask_flags(run.val_acc, row.get("sub_sub_acc"), row.get("n_kept"), cfg),
        mask_steps=run.steps,
        mask_best_step=run.best_step,
        mask_stopped_early=run.stopped_early,
        mask_budget_limited=budget_limited(
            run.steps, run.best_step, run.stopped_early, run.history, cfg.mask.min_density_drop
        ),
        mask_block_removable=(run.pruned or {}).get("block_removable", float("nan")),
        mask_final_temp=run.final_temp,
        mask_path=rel,
        hparams=json.dumps(hp, sort_keys=True),
        val_score=run.val_acc,
    )
    row.update(verdict_columns(row, margin=cfg.margin))
    return row


def run_masks_stage(base_job, base, store, searches, evaluations) -> None:
    """Train and choose the masks of every subroutine of one base model, evaluate every
    unfinished run and write its mask and row. Finished base models are skipped; a partly
    finished one retrains its masks (deterministic) and writes only the missing runs."""
    from subroutine_circuits.experiment.search import search_all
    from subroutine_circuits.experiment.timing import stage
    from subroutine_circuits.masks import save_mask

    cfg = base_job.cfg
    todo = [ev for ev in evaluations if not store.run_done(ev.key)]
    if not todo:
        return
    subs = [s.subroutine for s in searches]
    train = {s: base.enc["train"][f"sub_{s}"] for s in subs}
    val = {s: base.enc["val"][f"sub_{s}"] for s in subs}
    with stage("mask_search"):  # training + choice on validation data (experiment.timing)
        found = search_all(
            base.adapter,
            train,
            val,
            cfg.mask,
            [int(m) for m in cfg.mask_seeds],
            base.ablator(cfg.ablation),
            cfg.mask.engine,
            min_acc=cfg.mask_min_acc,
        )
    for s in subs:
        store.write_search(base_job.key, s, {"hp": found[s].hp, "log": found[s].log})
    others = {ev.subroutine: ev.other for ev in evaluations}
    runs = {ev.key: (ev, found[ev.subroutine].runs[ev.mask_seed]) for ev in todo}
    with stage("evaluation"):
        rows = _evaluate(base, cfg, runs, others, base_job.seed)
    for key, (ev, run) in runs.items():
        hp = found[ev.subroutine].hp
        save_mask(
            store.mask_path(key),
            run.mask,
            base.adapter,
            {
                "subroutine": ev.subroutine,
                "base_id": ev.base,
                "mask_seed": ev.mask_seed,
                "hparams": hp,
                "training": run.info(),
            },
        )
        store.write_run(key, run_row(base_job, base, ev, run, hp, rows[key], store.mask_rel(key)))
