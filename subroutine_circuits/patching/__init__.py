"""Activation / attribution patching with the masks' unit conventions, circuits from scores,
and comparison with mask subnetworks.

```python
from subroutine_circuits.patching import (
    activation_patching, attribution_patching, integrated_gradients, unit_groups, PatchScores,
    PatchBatch, top_k_circuit, threshold_circuit, faithfulness_curve, smallest_faithful_circuit,
    compare_with_mask, jaccard, roc_auc, spearman, PatchingConfig, run_patching,
)
```
Names are imported lazily so that importing the package stays cheap.
"""

from __future__ import annotations

from subroutine_circuits.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "Group": "activation",
    "PatchScores": "activation",
    "activation_patching": "activation",
    "merge_scores": "activation",
    "unit_groups": "activation",
    "attribution_patching": "attribution",
    "integrated_gradients": "attribution",
    "PatchBatch": "circuits",
    "FaithfulnessCurve": "circuits",
    "ablate_units": "circuits",
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
    "PatchingConfig": "run",
    "run_patching": "run",
    "sample_pairs": "run",
    "cmd_patch": "cli",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
