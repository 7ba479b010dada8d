"""The mask engine: unit maps, unit masks (hooks), weight masks, parametrisations, save/load.

Free of model-family knowledge: a model adapter (``subroutine_circuits.adapters``) says where
a family's units and maskable weights live; ``masks.ablation`` is the one ablation formula.

```python
from subroutine_circuits.masks import (
    UnitGroup, UnitMap, UnitMask, WeightMask, MaskConfig, Ablation,
    ContinuousSparsification, HardConcrete, save_mask, load_mask,
)
```
"""

from . import ablation
from .io import load_mask, model_signature, save_mask
from .parametrization import (
    Ablation,
    ContinuousSparsification,
    FixedMask,
    HardConcrete,
    MaskConfig,
    Parametrization,
)
from .unit_mask import UnitMask
from .units import UnitGroup, UnitMap
from .weight_mask import WeightMask

__all__ = [
    "ablation",
    "Ablation",
    "ContinuousSparsification",
    "FixedMask",
    "HardConcrete",
    "MaskConfig",
    "Parametrization",
    "UnitGroup",
    "UnitMap",
    "UnitMask",
    "WeightMask",
    "load_mask",
    "model_signature",
    "save_mask",
]
