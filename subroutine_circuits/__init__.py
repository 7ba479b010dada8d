"""subroutine_circuits: does a network break a compositional task into subroutines?

The public API (each name loads on first use, so ``import subroutine_circuits`` stays fast)::

    from subroutine_circuits import (
        get_task, make_splits,                              # tasks and odd-one-out problems
        build_model, load_model, save_model, train_model,   # models (as adapters)
        accuracy, train_mask, evaluate_mask,                # masks and the ablation matrix
        patch, compare,                                     # activation patching vs masks
        load_config, demo_config, run_experiment, build_report,  # the whole study
        validate,                                           # error rates on planted models
        export_circuit, import_circuit,                     # MIB / EAP-IG circuit JSON
        prompt_pairs, find_circuit, ablate_circuit, compare_circuits,  # your prompts, one metric
        pretrain_model, PromptPairs, LogitDiff, KLToFull, PairMetric,
        as_adapter, UnitMask, WeightMask, UnitMap, UnitGroup, MaskConfig,
        save_mask, load_mask, ExperimentConfig, RunStore,
    )

See :mod:`subroutine_circuits.api` for the verbs.
"""

from __future__ import annotations

from subroutine_circuits.utils import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "get_task": "api",
    "make_splits": "api",
    "build_model": "api",
    "load_model": "api",
    "save_model": "api",
    "train_model": "api",
    "accuracy": "api",
    "train_mask": "api",
    "evaluate_mask": "api",
    "patch": "api",
    "compare": "api",
    "load_config": "api",
    "demo_config": "api",
    "run_experiment": "api",
    "build_report": "api",
    "export_circuit": "api",
    "pretrain_model": "api",
    "prompt_pairs": "api",
    "find_circuit": "pairs",
    "ablate_circuit": "pairs",
    "compare_circuits": "pairs",
    "CircuitComparison": "pairs",
    "PromptPairs": "objectives",
    "LogitDiff": "objectives",
    "KLToFull": "objectives",
    "PairMetric": "objectives",
    "import_circuit": "api",
    "validate": "experiment.validate",
    "as_adapter": "adapters",
    "ModelAdapter": "adapters",
    "UnitMask": "masks",
    "WeightMask": "masks",
    "UnitMap": "masks",
    "UnitGroup": "masks",
    "MaskConfig": "masks",
    "save_mask": "masks",
    "load_mask": "masks",
    "ExperimentConfig": "experiment.config",
    "RunStore": "store",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
