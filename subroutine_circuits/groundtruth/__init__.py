"""Ground truth: planted models whose subnetworks are known, and scores against them.

``join`` puts two TransformerLens parts side by side in one ordinary ``HookedTransformer``;
``prune`` defines each part's planted units; ``planted`` builds modular, redundant, entangled
and random-init models (and caches them); ``truth`` re-checks a truth under the experiment's
ablation; ``entangled`` trains and checks entanglement; ``scoring`` turns a method's unit
scores into ROC AUC, precision and recall (the rows of ``groundtruth.csv``). Names are imported
lazily (torch and TransformerLens load on first use).
"""

from __future__ import annotations

from subroutine_circuits.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "BlockLayout": "join",
    "join_models": "join",
    "joined_spec": "join",
    "check_joinable": "join",
    "greedy_prune": "prune",
    "compact_part": "prune",
    "evaluate_ablations": "prune",
    "PruneResult": "prune",
    "KINDS": "planted",
    "PlantedConfig": "planted",
    "PlantedModel": "planted",
    "build_planted": "planted",
    "build_modular": "planted",
    "build_redundant": "planted",
    "build_random": "planted",
    "build_entangled": "planted",
    "EXPECTED": "planted",
    "save_planted": "planted",
    "load_planted": "planted",
    "AblationEvaluator": "truth",
    "truth_check": "truth",
    "subset_selectivity": "truth",
    "EntangledBuildError": "entangled",
    "truth_vector": "planted",
    "ROW_FIELDS": "scoring",
    "score_units": "scoring",
    "precision_recall": "scoring",
    "mask_unit_scores": "scoring",
    "top_k_kept": "scoring",
    "groundtruth_row": "scoring",
    "mask_row": "scoring",
    "error_rates": "scoring",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
