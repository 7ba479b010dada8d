"""HTML fragments shared by the report's sections: escaping, notes, figures, tables, intervals."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd


def _esc(x: Any) -> str:
    """HTML-escaped ``str(x)``."""
    return html.escape(str(x))


def _note(text: str) -> str:
    """A greyed-out paragraph."""
    return f'<p class="note">{_esc(text)}</p>'


def _fig(svg: str, caption: str = "") -> str:
    """Wrap an inline SVG figure with an optional caption."""
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure class="fig">{svg}{cap}</figure>'


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as an escaped HTML table (NaN shown as a dash)."""
    fmt = {}
    for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
            vals = df[c].dropna()
            integral = len(vals) > 0 and bool((vals == vals.round()).all())
            d = 0 if integral else digits
            fmt[c] = lambda v, d=d: "–" if pd.isna(v) else f"{v:.{d}f}"
    return df.to_html(index=False, escape=True, na_rep="–", formatters=fmt, border=0)


def _ci(m: float, lo: float, hi: float) -> str:
    """``mean [lo, hi]`` with two decimals (a dash for NaN)."""
    if m is None or np.isnan(m):
        return "–"
    if np.isnan(lo) or np.isnan(hi):
        return f"{m:+.2f} [no CI: 1 base model]"
    return f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"
