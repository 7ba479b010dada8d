"""The report's faithfulness-size frontier: one figure per (task, init, subroutine) from
``frontier.csv`` (methods as lines, the chosen masks as points) and the CPR / CMD table.

See :mod:`subroutine_circuits.patching.frontier` for what the columns measure (MIB's normalised
faithfulness, CPR and CMD, Mueller et al. 2025).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from subroutine_circuits.report import fragments as H
from subroutine_circuits.report import plots
from subroutine_circuits.store import RunStore

#: Line order and colours of the rankings (others follow in order of appearance).
METHOD_ORDER = (
    "mask", "mask path", "activation", "attribution", "integrated_gradients", "random"
)  # fmt: skip
_CELL = ["task", "init", "subroutine"]


def _methods(df: pd.DataFrame) -> list[str]:
    seen = df.loc[df["kind"] == "curve", "method"].unique().tolist()
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def frontier_plot(cell: pd.DataFrame, title: str) -> str:
    """Faithfulness (left) and subroutine accuracy (right) against circuit size (share of
    units, log scale) for one subroutine: each ranking's mean over base models as a line, each
    chosen mask as a point. Returns an SVG string."""
    plt = plots._plt()
    curves = cell[cell["kind"] == "curve"]
    chosen = cell[cell["kind"] == "point"]
    has_acc = bool(cell["accuracy"].notna().any())
    ncols = 2 if has_acc else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.4 * ncols, 3.0), squeeze=False)
    for col, (measure, label) in enumerate(
        [("faithfulness", "faithfulness (MIB)"), ("accuracy", "subroutine accuracy")][:ncols]
    ):
        ax = axes[0, col]
        for i, method in enumerate(_methods(cell)):
            m = curves[curves["method"] == method].groupby("fraction")[measure].mean()
            style = ":" if method == "random" else "-"
            ax.plot(m.index, m.values, ls=style, marker=".", color=f"C{i}", label=method)
        if len(chosen):
            ax.scatter(
                chosen["fraction"].clip(lower=1e-4), chosen[measure], marker="*", s=60,
                color="black", zorder=5, label="chosen mask",
            )  # fmt: skip
        ref = 1.0 if measure == "faithfulness" else cell["acc_full"].mean()
        ax.axhline(ref, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("share of units in the circuit")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return plots.fig_to_svg(fig)


def cpr_table(df: pd.DataFrame) -> pd.DataFrame:
    """CPR / CMD per (task, init, subroutine, ranking): mean over base models and mask seeds,
    with the number of frontiers ``n``; the chosen masks' median share of units and
    faithfulness in their own rows."""
    curves = df[df["kind"] == "curve"]
    keys = ("task", "init", "base_seed", "mask_seed", "subroutine", "method")
    keys = [c for c in keys if c in curves.columns]
    per = curves.groupby(keys, dropna=False)[["cpr", "cmd"]].first().reset_index()
    cell = [c for c in _CELL if c in per.columns]
    tab = per.groupby([*cell, "method"], dropna=False).agg(
        cpr=("cpr", "mean"), cmd=("cmd", "mean"), n=("cpr", "size")
    )
    tab = tab.reset_index()
    pts = df[df["kind"] == "point"]
    if len(pts):
        chosen = pts.groupby(cell, dropna=False).agg(
            chosen_share=("fraction", "median"), chosen_faithfulness=("faithfulness", "median")
        )
        tab = tab.merge(chosen.reset_index(), on=cell, how="left")
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    tab["_o"] = tab["method"].map(lambda m: order.get(m, len(order)))
    return tab.sort_values([*cell, "_o"]).drop(columns="_o").reset_index(drop=True)


def section_frontier(out_dir: Path) -> str:
    """The report section: what the frontier is, the CPR / CMD table and one figure per
    subroutine (or a note when ``frontier.csv`` is absent)."""
    path = RunStore(out_dir).frontier_csv
    if not path.is_file():
        return H._note("no frontier.csv: patching (and with it the frontier) was not run")
    df = pd.read_csv(path)
    if df.empty:
        return H._note("frontier.csv has no rows")
    out = [
        "<p>Faithfulness of the best circuit of each size, by ranking: the learned mask "
        "(its kept units first, then the rest; for a 1-minimal mask its units in the order a "
        "backward elimination on validation problems removes them, reversed, then the units a "
        "forward selection adds, up to 32 units), "
        "with [mask] frontier_path the mask path (at each size a mask trained with that size as "
        "its target density), "
        "activation and attribution patching (scores from the validation pairs), and random "
        "orders. Faithfulness is MIB's "
        "(m(C) - m(empty)) / (m(full) - m(empty)) on the test minimal pairs, the complement "
        "resampled from the corrupted input; accuracy is the subroutine's test accuracy with "
        "everything outside the circuit ablated as in the mask experiment. CPR is the area "
        "under faithfulness over circuit size in [0, 1] (higher is better), CMD the area of "
        "|1 - faithfulness| (lower is better), as in MIB (Mueller et al. 2025).</p>",
        H._table(cpr_table(df)),
    ]
    cell = [c for c in _CELL if c in df.columns]
    for key, g in df.groupby(cell, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        title = " / ".join(str(k) for k in key)
        n = g["base_seed"].nunique() if "base_seed" in g.columns else 1
        cap = f"lines: mean over {n} base model(s); stars: the chosen masks"
        out.append(H._fig(frontier_plot(g, title), cap))
    return "".join(out)
