"""Report sections of the verdict statistics: base-model verdicts, densities per unit kind,
mask-vs-patching agreement per unit kind with nulls, and the bypass check.

Every section reads the experiment folder's tables (``summary.csv``, ``agreement.csv``,
``results.csv``, ``manifest.json``; computed with :mod:`subroutine_circuits.analysis` when a
file is absent) and returns an HTML fragment; :func:`report.html.render_report` places them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from subroutine_circuits.analysis import inference
from subroutine_circuits.analysis import summary as stats
from subroutine_circuits.report import fragments as H
from subroutine_circuits.store import RunStore

#: Columns of summary.csv the verdict section needs (an older summary.csv is recomputed).
_SUMMARY_NEEDS = (
    "n_base_models", "base_models_compositional", "p_value", "p_holm", "itt_n_base_models",
)  # fmt: skip


def load_summary(out_dir: Path, results: pd.DataFrame, margin: float) -> pd.DataFrame:
    """``summary.csv`` when it holds the base-model columns, else :func:`stats.summary_frame`."""
    path = RunStore(out_dir).summary_csv
    if path.is_file():
        df = pd.read_csv(path)
        if all(c in df.columns for c in _SUMMARY_NEEDS) and len(df):
            notes = [c for c in df.columns if c.endswith("_note")]
            for c in ("control_init", "test", *notes):
                if c in df.columns:
                    df[c] = df[c].astype(object).where(df[c].notna(), "")
            return df
    return stats.summary_frame(out_dir, results, margin)


def _pct(x: Any) -> str:
    """A share as a percentage, a dash for NaN."""
    return "–" if x is None or pd.isna(x) else f"{100 * float(x):.1f}%"


def _p(x: Any) -> str:
    """A p-value with 3 significant digits, a dash for NaN."""
    return "–" if x is None or pd.isna(x) else f"{float(x):.3g}"


def _base_count(r: pd.Series) -> str:
    """``k/n [lo, hi]``: base models mostly compositional, with the Clopper-Pearson interval."""
    n = int(r["n_base_models"])
    if n == 0:
        return "n/a (no usable base model)"
    k = int(r["base_models_compositional"])
    lo, hi = r["base_models_compositional_lo"], r["base_models_compositional_hi"]
    return f"{k}/{n} [{lo:.2f}, {hi:.2f}]"


def _control(r: pd.Series) -> str:
    """The cell's test against its control: control init and GEE note when no GEE p."""
    if not r.get("control_init"):
        return "–"
    return str(r["control_init"])


#: summary.csv columns of the paper's criterion (absent from an older summary.csv).
_PAPER_COLUMNS = (
    "paper_base_models_compositional", "paper_n_base_models", "paper_runs_compositional",
    "paper_runs_usable",
)  # fmt: skip


def verdict_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The human-readable verdict table: one row per cell of summary.csv."""
    rows = []
    kinds = [c for c in summary.columns if c.startswith("density_") and c != "density_mean"]
    for _, r in summary.iterrows():
        row = {
            "task": r["task"],
            "model": r["model"],
            "init": r["init"],
            "subroutine": r["subroutine"],
            "base models compositional [95% CI]": _base_count(r),
            "runs compositional / usable": f"{int(r['runs_compositional'])}/"
            f"{int(r['runs_usable'])}",
            "search failed": int(r["runs_failed"]),
            "excluded runs": int(r["runs_excluded"]),
            "excluded / bypass base models": f"{int(r.get('base_models_excluded', 0))} / "
            f"{int(r.get('base_models_bypass', 0))}",
            "sub_diff [95% t CI]": H._ci(r["sub_diff_mean"], r["sub_diff_lo"], r["sub_diff_hi"]),
            "abl_diff [95% t CI]": H._ci(r["abl_diff_mean"], r["abl_diff_lo"], r["abl_diff_hi"]),
            "control": _control(r),
            "p": _p(r.get("p_value")),
            "p (Holm)": _p(r.get("p_holm")),
            "GEE p": _p(r.get("gee_p")),
        }
        if int(summary.get("runs_no_control", pd.Series([0])).sum()) > 0:
            row["no random control"] = int(r.get("runs_no_control", 0))
        if int(summary.get("runs_residual", pd.Series([0])).sum()) > 0:
            row["residual path"] = int(r.get("runs_residual", 0))
        budget = summary.get("runs_budget_limited")
        if budget is not None and budget.notna().any():
            n_bl = r["runs_budget_limited"]
            row["searches cut off by the budget"] = "–" if pd.isna(n_bl) else int(n_bl)
        if "runs_straddle" in summary.columns and summary["runs_straddle"].notna().any():
            row["usable runs straddling a margin"] = (
                "–"
                if pd.isna(r["runs_straddle"])
                else f"{int(r['runs_straddle'])} ({_pct(r['runs_straddle_frac'])})"
            )
        if "itt_n_base_models" in summary.columns:
            row["intention to treat: base models / runs"] = (
                f"{int(r['itt_base_models_compositional'])}/{int(r['itt_n_base_models'])}; "
                f"{int(r['itt_runs_compositional'])}/{int(r['runs_total'])}"
            )
        if all(c in summary.columns for c in _PAPER_COLUMNS):
            row["paper criterion: base models / runs"] = (
                f"{int(r['paper_base_models_compositional'])}/{int(r['paper_n_base_models'])}; "
                f"{int(r['paper_runs_compositional'])}/{int(r['paper_runs_usable'])}"
            )
        for c in kinds:
            row[f"{c.removeprefix('density_')}s kept"] = _pct(r[c])
        rows.append(row)
    return pd.DataFrame(rows)


_VERDICT_TEXT = (
    "<p>A <b>run</b> (one mask of one base model) is <i>compositional</i> when its mask search "
    "succeeded (<code>mask_ok</code>: validation accuracy on its own subroutine at least the "
    "success threshold), sub_diff &gt; {m}, abl_diff &lt; -{m} and its ablation beats matched "
    "random subnetworks (<code>randabl_p</code> &le; 0.05). A run that fails a margin is "
    "<i>not compositional</i> whatever the random control says. Runs whose search failed are "
    "<i>search failed</i>, runs of base models that failed the composite task (on validation "
    "data) or let information bypass the masks are <i>excluded</i>, runs that pass both "
    "margins but have no random control are <i>no random control</i>: none of these counts as "
    "compositional nor as not compositional. A successful mask that keeps no unit (fewer than "
    "<code>min_mask_units</code>) is <i>residual path</i>: its subroutine is solved around the "
    "maskable units, and it too enters no count of ours. <code>mask_ok</code> needs the "
    "success threshold on the validation problems the search chose the mask on and on the test "
    "problems of its subroutine, which the search never saw. <i>Paper criterion</i>: the same "
    "counts with the margins alone (no random control), base models mostly compositional / "
    "usable; runs compositional / usable. The two differ by the matched random null: a run "
    "passes ours only when removing its subnetwork is more specific to its subroutine than "
    "removing random subnetworks of the same shape. <i>Intention to treat</i>: every run "
    "counts, only compositional runs as compositional. <i>Straddling</i>: usable runs whose "
    "95% bootstrap interval over test problems of sub_diff or abl_diff contains the margin.</p>"
    "<p>The <b>base model</b> is the unit of analysis (mask seeds of one model search the same "
    "weights). A base model counts as compositional when more than half of its usable runs "
    "are; the interval of that count is exact (Clopper-Pearson, 95%). Differences are means "
    "over base-model means with Student-t 95% intervals. <i>p</i>: exact permutation test over "
    "base models of the share of compositional runs against the control init (trained vs "
    "random_init, pretrained vs trained); <i>p (Holm)</i>: Holm's correction over every test "
    "of this experiment; <i>GEE p</i>: a logistic GEE with errors clustered by base model, a "
    "secondary reading (needs at least 10 base models; empty otherwise). No cell is labelled: "
    "read the counts, their intervals and the corrected p-values.</p>"
)


def _failed_runs(results: pd.DataFrame, margin: float) -> str:
    """A collapsible list of the runs that are 'search failed' / 'excluded' / no control."""
    runs = inference.run_verdicts(results, margin)
    bad = runs[~runs["usable"]]
    if bad.empty:
        return "<p>Every run is usable (no failed search, no excluded base model).</p>"
    cols = [*inference.BASE_KEYS, "mask_seed", "verdict"]
    cols += [c for c in ("mask_val_acc", "composite_acc", "bypass") if c in bad.columns]
    counts = ", ".join(f"{v}: {n}" for v, n in bad["verdict"].value_counts().items())
    return (
        f"<details><summary>Runs that enter no verdict ({H._esc(counts)})</summary>"
        f"{H._table(bad[cols].reset_index(drop=True))}</details>"
    )


def paired_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The paired one-sided tests of summary.csv (``paired_vs_<control>_<analysis>_*``) as one
    row per (task, model, subroutine, init > control, analysis); empty without them."""
    rows = []
    for _, r in summary.iterrows():
        for control in ("trained", "random_init"):
            for analysis in inference.ANALYSES:
                pre = f"paired_vs_{control}_{analysis}"
                if f"{pre}_p" not in summary.columns or pd.isna(r.get(f"{pre}_n_pairs")):
                    continue
                note = r.get(f"{pre}_note", "")
                rows.append({
                    "task": r["task"], "model": r["model"], "subroutine": r["subroutine"],
                    "test": f"{r['init']} > {control}",
                    "analysis": "usable runs" if analysis == "usable" else "intention to treat",
                    "pairs": int(r[f"{pre}_n_pairs"]),
                    "mean difference": "–" if pd.isna(r[f"{pre}_diff"])
                    else f"{float(r[f'{pre}_diff']):+.2f}",
                    "p (one-sided)": _p(r[f"{pre}_p"]),
                    "p (Holm)": _p(r[f"{pre}_p_holm"]),
                    "why not run": note if isinstance(note, str) else "",
                })  # fmt: skip
    return pd.DataFrame(rows)


_PAIRED_TEXT = (
    "<h3>Paired one-sided tests</h3><p>Base models of two inits with the same base seed share "
    "their data and training seed. Per pair, the difference of the two base models' shares of "
    "compositional runs; exact sign-flip test that the mean difference is above 0. "
    "<i>Usable runs</i>: shares over usable runs (the primary analysis); <i>intention to "
    "treat</i>: shares over every run, a failed search, an excluded base model or a residual "
    "path counting as not compositional (defined for random init too). Holm's correction "
    "within each analysis. A test that could not run says why.</p>"
)


def section_verdicts(
    out_dir: Path, results: pd.DataFrame, margin: float, summary: pd.DataFrame | None = None
) -> str:
    """Verdict table per (task, model, init, subroutine) from summary.csv."""
    summary = load_summary(out_dir, results, margin) if summary is None else summary
    body = H._table(verdict_table(summary))
    paired = paired_table(summary)
    if len(paired):
        body += _PAIRED_TEXT + H._table(paired)
    return _VERDICT_TEXT.format(m=margin) + body + _failed_runs(results, margin)


def section_densities(out_dir: Path, results: pd.DataFrame, margin: float) -> str:
    """Share of each unit kind kept, per cell and per layer (heads and neurons apart)."""
    runs = inference.run_verdicts(results, margin)
    runs = runs[runs["verdict"].isin(stats._DENSITY_VERDICTS)]
    dens = stats.kind_densities(out_dir, runs)
    if dens.empty:
        return H._note("no readable unit masks: densities per unit kind unavailable")
    agg = (
        dens.groupby([*inference.CELL_KEYS, "kind"], sort=True)
        .agg(
            runs=("density", "size"),
            units=("n_units", "first"),
            kept_mean=("n_kept", "mean"),
            share_kept=("density", "mean"),
            share_min=("density", "min"),
            share_max=("density", "max"),
        )
        .reset_index()
    )
    for c in ("share_kept", "share_min", "share_max"):
        agg[c] = agg[c].map(_pct)
    return (
        "<p>Share of the units of each kind that a mask keeps (usable runs; min and max over "
        "runs describe the spread, they are not an interval). A mask keeping a few heads and "
        "almost no neurons is a head circuit, which a pooled density hides.</p>"
        + H._table(agg, digits=1)
    )


def _agreement_agg(df: pd.DataFrame) -> pd.DataFrame:
    """Agreement rows averaged over base models, with the count of significant ones."""
    keys = ["task", "init", "subroutine", "method", "scope", "kind", "layer"]
    num = df.copy()
    for c in ("k", "jaccard", "expected_jaccard", "spearman", "auc", "baseline_auc"):
        num[c] = pd.to_numeric(num[c], errors="coerce")
    for c in ("jaccard_p", "spearman_p", "auc_p"):
        num[c + "<.05"] = pd.to_numeric(num[c], errors="coerce") < 0.05
    agg = (
        num.groupby(keys, sort=False, dropna=False)
        .agg(
            n=("jaccard", "size"),
            units=("n_units", "first"),
            k=("k", "mean"),
            jaccard=("jaccard", "mean"),
            jaccard_null=("expected_jaccard", "mean"),
            **{"jaccard p<.05": ("jaccard_p<.05", "sum")},
            spearman=("spearman", "mean"),
            **{"spearman p<.05": ("spearman_p<.05", "sum")},
            auc=("auc", "mean"),
            **{"auc p<.05": ("auc_p<.05", "sum")},
            baseline_auc=("baseline_auc", "mean"),
        )
        .reset_index()
    )
    agg["layer"] = agg["layer"].map(lambda x: "all" if x == -1 else x)
    return agg


def section_agreement(out_dir: Path) -> str:
    """Mask vs patching per unit kind (and per layer), each statistic next to its null."""
    path = RunStore(out_dir).root / stats.AGREEMENT_CSV
    df = pd.read_csv(path) if path.is_file() else stats.agreement_frame(out_dir)
    if df.empty:
        return H._note("no agreement table (patching off, or no unit mask to compare with)")
    agg = _agreement_agg(df)
    order = {"kind": 0, "kind_layer": 1, "pooled": 2}
    agg = agg.sort_values(
        by=["task", "init", "subroutine", "method", "scope"],
        key=lambda s: s.map(order) if s.name == "scope" else s,
        kind="stable",
    )
    return (
        "<p>Per unit kind (heads and neurons apart: their patching scores differ by orders of "
        "magnitude) and per layer, averaged over the <i>n</i> base models: Jaccard of the "
        "mask with the top-k patching units (k = units the mask keeps) next to "
        "<i>jaccard_null</i>, the expected Jaccard of a random k-subset; Spearman of |score| "
        "with the mask's per-unit parameters; ROC AUC of |score| for the kept units; the "
        "number of base models where each reaches p &lt; 0.05 (hypergeometric, permutation, "
        "Mann-Whitney). <i>baseline_auc</i>: the AUC of a trivial 'earlier layers first' "
        "ranking. The pooled rows mix kinds and are shown for reference only.</p>"
        + H._table(agg.reset_index(drop=True), digits=2)
    )


def section_bypass(manifest: dict[str, Any]) -> str:
    """The bypass check per base model (accuracies with every maskable unit ablated)."""
    check = manifest.get("bypass_check")
    if not check:
        return H._note("no bypass check in the manifest (results of an older version)")
    items = check.items() if isinstance(check, dict) else enumerate(check)
    rows = []
    for key, val in items:
        row: dict[str, Any] = {"base model": key}
        if isinstance(val, dict):
            for k, v in val.items():
                if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
                    # accuracies with everything ablated: one rounded column per problem kind
                    row.update({f"{k}: {kk}": round(float(x), 3) for kk, x in v.items()})
                elif isinstance(v, list):
                    row[k] = ", ".join(map(str, v))
                elif isinstance(v, float):
                    row[k] = round(v, 3)
                elif isinstance(v, (int, str, bool)) or v is None:
                    row[k] = v
                else:
                    row[k] = json.dumps(v)
        else:
            row["value"] = val
        rows.append(row)
    table = pd.DataFrame(rows)
    flagged = [str(r["base model"]) for r in rows if bool(r.get("bypass", False))]
    note = (
        f"<p>Bypassing base models (kept out of every verdict): {H._esc(', '.join(flagged))}</p>"
        if flagged
        else "<p>No base model bypasses the masks.</p>"
    )
    return (
        "<p>With every maskable unit ablated, accuracy should fall to chance; a base model "
        "whose composite or partition accuracy stays above chance + 0.1 lets information "
        "reach the readout around the masks and is flagged <i>bypass</i>.</p>"
        + note
        + H._table(table)
    )


__all__ = [
    "load_summary",
    "verdict_table",
    "section_verdicts",
    "section_densities",
    "section_agreement",
    "section_bypass",
]
