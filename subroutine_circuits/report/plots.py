"""Figures of the report, returned as inline SVG strings (matplotlib, Agg backend, no files).

Every function takes tables (pandas) or arrays and returns an ``<svg ...>...</svg>`` string that
``report.html`` embeds directly, so the page needs nothing but itself to render. The XML prolog,
DOCTYPE and namespace declarations of matplotlib's SVG are stripped: inline ``<svg>`` in HTML5 gets
its namespace (and ``xlink:href``) from the HTML parser, and no URL is left in the markup.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float

from subroutine_circuits.analysis.inference import t_interval
from subroutine_circuits.analysis.summary import CHANCE

#: Conditions of the accuracy plot: label -> column prefix in results.csv.
CONDITIONS: dict[str, str] = {
    "full": "full",
    "subnetwork": "sub",
    "ablated": "abl",
    "mean-ablated": "ablmean",
    "zero-ablated": "ablzero",
    "resample-ablated": "ablresample",
    "random ablated": "randabl",
}
INIT_ORDER = ("pretrained", "trained", "random_init")
_COLORS = {"target": "#1f77b4", "other": "#ff7f0e"}
_NS_RE = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')


def _plt():
    """matplotlib.pyplot with the Agg backend and text kept as text in SVG output."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"
    plt.rcParams["svg.hashsalt"] = "subroutine-circuits"
    return plt


def fig_to_svg(fig) -> str:
    """Render a matplotlib figure to an inline ``<svg>`` string and close the figure."""
    plt = _plt()
    buf = io.StringIO()
    fig.savefig(
        buf,
        format="svg",
        bbox_inches="tight",
        metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
    )
    plt.close(fig)
    text = buf.getvalue()
    start = text.find("<svg")
    if start < 0:
        raise ValueError("matplotlib produced no <svg> element")
    text = text[start:]
    head_end = text.find(">")
    head = _NS_RE.sub("", text[:head_end])
    return head + text[head_end:]


def order_inits(inits: Sequence[str]) -> list[str]:
    """Inits in the reading order pretrained, trained, random_init, then any others."""
    known = [i for i in INIT_ORDER if i in inits]
    return known + sorted(i for i in set(inits) if i not in INIT_ORDER)


def usable_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Runs that may enter a verdict: base model usable (``base_ok``, no ``bypass``) and mask
    search succeeded (``mask_ok``); absent flag columns (older results) do not filter."""
    keep = pd.Series(True, index=results.index)
    for col, good in (("base_ok", True), ("bypass", False), ("mask_ok", True)):
        if col in results.columns:
            keep &= results[col].fillna(good).astype(bool) == good
    return results[keep]


def _mean_ci(df: pd.DataFrame, col: str) -> tuple[float, float, float]:
    """Mean over base-model means and its Student-t 95% interval (base models are the unit:
    mask seeds of one base model are not independent). NaN bounds with one base model."""
    if col not in df.columns or df.empty:
        return (float("nan"),) * 3
    vals = pd.to_numeric(df[col], errors="coerce")
    per_base = vals.groupby(df["base_seed"]).mean().to_numpy(dtype=float)
    return t_interval(per_base)


def accuracy_bars(results: pd.DataFrame, task: str, subroutine: str) -> str:
    """Grouped bars: target/other accuracy per condition, one panel per init, with the mean
    over base models and its t interval.

    Uses the usable rows (:func:`usable_rows`) of one (task, subroutine); conditions whose
    columns are absent are left out. A dotted line marks chance.
    """
    plt = _plt()
    df = usable_rows(results)
    df = df[(df["task"] == task) & (df["subroutine"] == subroutine)]
    inits = order_inits(df["init"].unique().tolist())
    if not inits:
        raise ValueError(f"no usable rows for task {task!r}, subroutine {subroutine!r}")
    conds = [
        (label, p)
        for label, p in CONDITIONS.items()
        if f"{p}_target_acc" in df.columns and df[f"{p}_target_acc"].notna().any()
    ]
    fig, axes = plt.subplots(
        1, len(inits), figsize=(3.4 * len(inits), 3.0), sharey=True, squeeze=False
    )
    x = np.arange(len(conds))
    for ax, init in zip(axes[0], inits):
        g = df[df["init"] == init]
        for j, which in enumerate(("target", "other")):
            stats = [_mean_ci(g, f"{p}_{which}_acc") for _, p in conds]
            means = np.array([s[0] for s in stats])
            err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
            ax.bar(
                x + (j - 0.5) * 0.38,
                means,
                width=0.38,
                yerr=np.clip(np.nan_to_num(err), 0.0, None),
                capsize=2,
                color=_COLORS[which],
                label=which,
            )
        ax.axhline(CHANCE, color="gray", ls=":", lw=1)
        ax.set_xticks(x, [c[0] for c in conds], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{init} ({g['base_seed'].nunique()} base models)", fontsize=9)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{task}: subroutine {subroutine}", fontsize=10)
    return fig_to_svg(fig)


def diff_scatter(results: pd.DataFrame, task: str, margin: float = 0.05) -> str:
    """sub_diff (x) against abl_diff (y) per run, one panel per init, colour per subroutine.

    The shaded quadrant ``sub_diff > margin, abl_diff < -margin`` is the compositional pattern;
    runs that cannot enter a verdict (excluded or bypassing base model, failed mask search) are
    drawn as hollow markers.
    """
    plt = _plt()
    df = results[results["task"] == task].copy()
    df["_usable"] = df.index.isin(usable_rows(df).index)
    inits = order_inits(df["init"].unique().tolist())
    if not inits:
        raise ValueError(f"no rows for task {task!r}")
    subs = sorted(df["subroutine"].unique())
    markers = ["o", "s", "^", "D"]
    fig, axes = plt.subplots(
        1, len(inits), figsize=(3.2 * len(inits), 3.2), sharex=True, sharey=True, squeeze=False
    )
    for ax, init in zip(axes[0], inits):
        g = df[df["init"] == init]
        ax.fill_between([margin, 1.0], -1.0, -margin, color="#2ca02c", alpha=0.12, lw=0)
        for k, sub in enumerate(subs):
            s = g[g["subroutine"] == sub]
            for ok, face in ((True, None), (False, "none")):
                t = s[s["_usable"] == ok]
                if t.empty:
                    continue
                color = f"C{k}"
                ax.scatter(
                    t["sub_diff"],
                    t["abl_diff"],
                    s=18,
                    marker=markers[k % len(markers)],
                    facecolors=face if face else color,
                    edgecolors=color,
                    label=sub if ok else f"{sub} (not usable)",
                )
        ax.axhline(0, color="gray", lw=0.6)
        ax.axvline(0, color="gray", lw=0.6)
        ax.set_xlim(-0.8, 0.8)
        ax.set_ylim(-0.8, 0.8)
        ax.set_xlabel("sub_diff")
        ax.set_title(init, fontsize=9)
    axes[0][0].set_ylabel("abl_diff")
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{task}: subnetwork vs ablation difference per run", fontsize=10)
    return fig_to_svg(fig)


def head_grid(freq: pd.DataFrame) -> tuple[np.ndarray, list[int]]:
    """A layer x head array of kept frequencies from :func:`stats.kept_frequency` rows."""
    h = freq[freq["kind"] == "head"]
    if h.empty:
        raise ValueError("no head units in the mask frequency table")
    layers = sorted(h["layer"].unique())
    n_heads = int(h["index"].max()) + 1
    grid = np.full((len(layers), n_heads), np.nan)
    for (layer, idx), f in zip(zip(h["layer"], h["index"]), h["freq"]):
        grid[layers.index(layer), int(idx)] = f
    return grid, [int(x) for x in layers]


def heatmap_panels(
    panels: Sequence[tuple[str, Float[np.ndarray, "layer head"], Sequence[int]]],
    title: str,
    cbar_label: str = "kept frequency",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> str:
    """Side-by-side layer x head heatmaps; ``panels`` = (title, grid, layer labels)."""
    plt = _plt()
    if not panels:
        raise ValueError("heatmap_panels needs at least one panel")
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.9 * len(panels), 0.5 * max(len(p[2]) for p in panels) + 1.6),
        squeeze=False,
    )  # fmt: skip
    im = None
    for ax, (name, grid, layers) in zip(axes[0], panels):
        im = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(layers)), [f"L{x}" for x in layers], fontsize=7)
        ax.set_xticks(range(grid.shape[1]), [f"H{x}" for x in range(grid.shape[1])], fontsize=7)
        ax.set_title(name, fontsize=8)
        if grid.size <= 64:
            for (r, c), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label=cbar_label)
    fig.suptitle(title, fontsize=9, y=1.04)
    return fig_to_svg(fig)


def neuron_density(freq: pd.DataFrame, title: str) -> str:
    """Mean kept fraction of MLP neurons per layer, one line per (init, subroutine)."""
    plt = _plt()
    n = freq[freq["kind"] == "neuron"]
    if n.empty:
        raise ValueError("no neuron units in the mask frequency table")
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for (init, sub), g in n.groupby(["init", "subroutine"], sort=True):
        per_layer = g.groupby("layer")["freq"].mean()
        ax.plot(per_layer.index, per_layer.values, marker="o", label=f"{init} / {sub}")
    ax.set_xticks(sorted(int(x) for x in n["layer"].unique()))
    ax.set_xlabel("layer")
    ax.set_ylabel("neuron density")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    return fig_to_svg(fig)


def attention_heatmaps(
    patterns: Sequence[Float[np.ndarray, "dest src"]],
    labels: Sequence[str],
    str_tokens: Sequence[str],
    title: str,
) -> str:
    """Small attention-pattern heatmaps (one per head) over one stimulus's tokens."""
    plt = _plt()
    if len(patterns) != len(labels) or not patterns:
        raise ValueError("attention_heatmaps needs one label per pattern and at least one")
    n = len(patterns)
    size = 0.22 * len(str_tokens) + 1.0
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.6), squeeze=False, sharey=True)
    ticks = range(len(str_tokens))
    for i, (ax, pat, lab) in enumerate(zip(axes[0], patterns, labels)):
        ax.imshow(np.asarray(pat), vmin=0.0, vmax=1.0, cmap="Blues")
        ax.set_xticks(ticks, list(str_tokens), rotation=90, fontsize=6)
        if i == 0:
            ax.set_yticks(ticks, list(str_tokens), fontsize=6)
        ax.set_title(lab, fontsize=7)
    fig.suptitle(title, fontsize=8, y=1.02)
    return fig_to_svg(fig)


def faithfulness_curves(curves: Sequence[dict], title: str) -> str:
    """Target/other accuracy of a circuit's ablation as a function of its size.

    Each curve is a dict with ``label``, ``k`` (sizes), ``target_acc`` and ``other_acc``.
    """
    plt = _plt()
    if not curves:
        raise ValueError("faithfulness_curves needs at least one curve")
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    for i, c in enumerate(curves):
        k = np.asarray(c["k"], dtype=float)
        ax.plot(k, c["target_acc"], color=f"C{i}", marker=".", label=f"{c['label']} target")
        ax.plot(k, c["other_acc"], color=f"C{i}", ls="--", label=f"{c['label']} other")
    ax.axhline(CHANCE, color="gray", ls=":", lw=1)
    ax.set_xlabel("units ablated (k)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    return fig_to_svg(fig)


def circuit_faithfulness(curves: Sequence[dict], title: str) -> str:
    """Faithfulness of a patching circuit against its size (fraction of units kept).

    Each curve is a dict with ``label``, ``fractions`` and ``faithfulness`` (1 = the full model's
    metric, 0 = the fully ablated model's).
    """
    plt = _plt()
    if not curves:
        raise ValueError("circuit_faithfulness needs at least one curve")
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    for i, c in enumerate(curves):
        ax.plot(c["fractions"], c["faithfulness"], color=f"C{i}", marker=".", label=c["label"])
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("fraction of units in the circuit")
    ax.set_ylabel("faithfulness")
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    return fig_to_svg(fig)
