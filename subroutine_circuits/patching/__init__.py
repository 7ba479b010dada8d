"""Patching, a generic library: scores, circuits and comparison metrics over unit groups.

It knows nothing of the study (tasks, experiment folders): it acts on a model through its
adapter (``subroutine_circuits.adapters``) and on the masks' unit vocabulary
(:class:`~subroutine_circuits.masks.UnitGroup` / :class:`~subroutine_circuits.masks.UnitMap`).
The study's patching driver (minimal pairs of a task, OOO metrics, comparison with the mask of a
run) is :mod:`subroutine_circuits.experiment.patching`.

```python
from subroutine_circuits.patching import (
    activation_patching, attribution_patching, integrated_gradients, PatchScores, merge_scores,
    PatchBatch, top_k_circuit, threshold_circuit, faithfulness_curve, smallest_faithful_circuit,
    circuit_metrics, ablate_units, compare_with_mask, jaccard, roc_auc, spearman,
)
```
Names are imported lazily so that importing the package stays cheap.
"""

from __future__ import annotations

from subroutine_circuits.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "PatchScores": "scores",
    "merge_scores": "scores",
    "resolve_groups": "scores",
    "activation_patching": "activation",
    "attribution_patching": "attribution",
    "integrated_gradients": "attribution",
    "PatchBatch": "circuits",
    "FaithfulnessCurve": "circuits",
    "ablate_units": "circuits",
    "ablation_values": "circuits",
    "circuit_metrics": "circuits",
    "curve_areas": "circuits",
    "faithfulness_curve": "circuits",
    "smallest_faithful_circuit": "circuits",
    "threshold_circuit": "circuits",
    "top_k_circuit": "circuits",
    "compare_with_mask": "compare",
    "jaccard": "compare",
    "roc_auc": "compare",
    "spearman": "compare",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
