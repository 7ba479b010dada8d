"""Allow ``python -m subroutine_circuits``."""

from subroutine_circuits.cli import main

raise SystemExit(main())
