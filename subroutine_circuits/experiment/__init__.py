"""The study: configuration, jobs, stages, executors, the patching driver and the runner.

```python
from subroutine_circuits.experiment import load_config, demo_config, run_experiment
```
"""

from subroutine_circuits.experiment.config import (
    DataConfig,
    ExperimentConfig,
    MaskSearchConfig,
    ModelConfig,
    config_from_dict,
    demo_config,
    load_config,
)


def run_experiment(cfg, out_dir, progress: bool = True):
    """Run or resume an experiment (see ``experiment.runner.run_experiment``)."""
    from subroutine_circuits.experiment.runner import run_experiment as _run

    return _run(cfg, out_dir, progress=progress)


__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "MaskSearchConfig",
    "ModelConfig",
    "config_from_dict",
    "demo_config",
    "load_config",
    "run_experiment",
]
