"""``validate`` on planted models with the sparsity path (issue 23): the demo's settings with
a grid of a fixed-weight point and target densities 0.1 and 0.05, ``choose = "smallest"``.

    python benchmarks/validate_sparsity_path.py OUT

Prints the verdict error rates and the frontier criteria on the modular models.
"""

from __future__ import annotations

import sys

GRID = [{"l0_weight": 1.0}, {"target_density": 0.1}, {"target_density": 0.05}]

if __name__ == "__main__":  # validate starts worker processes
    from subroutine_circuits.experiment.validate import (
        ValidateConfig,
        error_rates_frame,
        validate,
    )

    cfg = ValidateConfig(experiment={"mask": {"choose": "smallest", "grid": GRID}})
    rates = error_rates_frame(validate(sys.argv[1], cfg=cfg))
    keys = ("false_compositional", "missed_compositional", "n_modular", "n_non_compositional")
    print({k: rates[k] for k in keys})
    print(rates["frontier"])
