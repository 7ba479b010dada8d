"""The mask engine: unit maps, unit masks (hooks), weight masks, parametrisations, save/load.

```python
from subroutine_circuits.masks import (
    UnitGroup, UnitMap, UnitMask, WeightMask, MaskConfig, Ablation,
    ContinuousSparsification, HardConcrete, save_mask, load_mask,
)
```
"""

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
from .weight_mask import DEFAULT_WEIGHT_SUFFIXES, WeightMask

__all__ = [
    "Ablation",
    "ContinuousSparsification",
    "DEFAULT_WEIGHT_SUFFIXES",
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
