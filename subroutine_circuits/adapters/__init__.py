"""Model adapters: the one place that knows a model family (see ``adapters.base``).

```python
from subroutine_circuits.adapters import (
    ModelAdapter, EncodedProblems, Recorded, as_adapter, register_adapter,
    TransformerLensAdapter, HookedModuleAdapter, BridgeAdapter, CNNAdapter,
)
```
Names load lazily: importing the package imports neither torch nor TransformerLens.
"""

from __future__ import annotations

from typing import Any

from subroutine_circuits.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "ModelAdapter": "base",
    "EncodedProblems": "base",
    "Recorded": "base",
    "register_adapter": "base",
    "TransformerLensAdapter": "transformer_lens",
    "tl_unit_map": "transformer_lens",
    "HookedModuleAdapter": "hooked",
    "BridgeAdapter": "bridge",
    "CNNAdapter": "cnn",
}

__all__ = sorted([*_EXPORTS, "as_adapter"])

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


def as_adapter(model: Any, **options: Any):
    """``model`` wrapped in the adapter registered for its class (an adapter is returned as is).

    ``options`` go to the adapter (for TransformerLens models ``tokenizer=`` and ``pool=``).

    Raises:
        ValueError: when no adapter is registered for the model's class, or options are given
            for an existing adapter.
    """
    from subroutine_circuits.adapters import (
        bridge,  # noqa: F401  (registers TL 4 bridges)
        cnn,  # noqa: F401  (registers the hooked CNN)
        transformer_lens,  # noqa: F401  (registers TL 3.9)
    )
    from subroutine_circuits.adapters.base import ModelAdapter, registered_adapters

    if isinstance(model, ModelAdapter):
        if options:
            raise ValueError("as_adapter: options given for a model that is already an adapter")
        return model
    for matches, factory in registered_adapters():
        if matches(model):
            return factory(model, **options)
    raise ValueError(
        f"no model adapter for {type(model).__name__}; wrap it explicitly, e.g. "
        "HookedModuleAdapter(model, unit_map=UnitMap([...]))"
    )
