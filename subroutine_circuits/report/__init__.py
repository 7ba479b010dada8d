"""The experiment report: ``build_report(out_dir) -> Path`` writes a self-contained report.html.

Imported lazily so that ``import subroutine_circuits.report`` does not pull in matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_report", "render_report", "ReportConfig"]


def build_report(out_dir: Any, cfg: Any = None) -> Path:
    """Write ``OUT/report.html`` for an experiment folder; see :func:`report.html.build_report`."""
    from subroutine_circuits.report.html import build_report as _build

    return _build(out_dir, cfg)


def __getattr__(name: str) -> Any:
    """``render_report`` and ``ReportConfig`` from :mod:`subroutine_circuits.report.html`."""
    if name in ("render_report", "ReportConfig"):
        from subroutine_circuits.report import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
