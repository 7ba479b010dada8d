"""``report.html``: one self-contained, offline page summarising an experiment folder.

Every figure is inline SVG (see :mod:`subroutine_circuits.report.plots`); the optional circuitsvis
widget is inlined with ``.local_src`` (its JavaScript bundle is in the page, nothing is fetched).
Each section is built independently: a section whose inputs are missing (no masks, no model
checkpoints, no ``patching.csv``) or fail to load shows a short note instead, so a partial
experiment folder still gets a report.
"""

from __future__ import annotations

import json
import os
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Int
from torch import Tensor

from subroutine_circuits.analysis import summary as stats
from subroutine_circuits.report import plots, vision
from subroutine_circuits.report.fragments import _esc, _fig, _note, _table
from subroutine_circuits.store import RunStore, base_id
from subroutine_circuits.utils import atomic_write_text

CV_BEGIN = "<!-- circuitsvis:begin -->"
CV_END = "<!-- circuitsvis:end -->"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
.note { color: #777; font-style: italic; } .fig { margin: 0.8em 0; overflow-x: auto; }
.verdict-compositional { background: #d9f2d9; } .verdict-not { background: #f7dede; }
.verdict-inconclusive { background: #fff4cc; }
pre { background: #f7f7f7; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
"""


@dataclass
class ReportConfig:
    """Options of :func:`build_report`.

    seed: seed of the example stimuli drawn for the attention patterns;
    circuitsvis: embed one interactive circuitsvis attention widget (adds ~1.3 MB of inlined JS);
    n_examples: example stimuli per model for the attention patterns; max_heads: most kept heads
    drawn per model; device: where checkpoints are loaded for the attention patterns.
    """

    seed: int = 0
    circuitsvis: bool = True
    n_examples: int = 2
    max_heads: int = 8
    device: str = "cpu"


# ----------------------------------------------------------------------------- helpers


# _esc, _note, _fig, _table, _ci live in report/fragments.py (shared with report/verdicts.py)


def _find_key(obj: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a nested dict/list (None when absent)."""
    if isinstance(obj, dict):
        if key in obj and not isinstance(obj[key], (dict, list)):
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


# ----------------------------------------------------------------------------- sections


def section_run(manifest: dict[str, Any], results: pd.DataFrame) -> str:
    """Run summary: device, versions, timings, excluded base models, config."""
    parts = []
    inits = ", ".join(plots.order_inits(results["init"].unique().tolist()))
    mask_kinds = "?"
    if "mask_kind" in results.columns:
        mask_kinds = ", ".join(sorted(results["mask_kind"].astype(str).unique()))
    n_base = results.groupby(["task", "model", "init"])["base_seed"].nunique().sum()
    parts.append(
        "<ul>"
        f"<li>tasks: {_esc(', '.join(sorted(results['task'].unique())))}</li>"
        f"<li>models: {_esc(', '.join(sorted(results['model'].unique())))}; inits: {_esc(inits)}"
        f"</li><li>base models: {int(n_base)}; runs (rows): {len(results)}; mask seeds: "
        f"{_esc(sorted(results['mask_seed'].unique().tolist()))}</li>"
        f"<li>mask kinds: {_esc(mask_kinds)}</li>"
        f"<li>device: {_esc(manifest.get('device', 'unknown'))}</li>"
        f"<li>margin: {_esc(manifest.get('margin', stats.DEFAULT_MARGIN))}; chance: "
        f"{_esc(manifest.get('chance', stats.CHANCE))}</li></ul>"
    )
    excluded = manifest.get("excluded_base_models")
    if excluded is None:
        bad = results[~results["base_ok"]]
        excluded = sorted(
            {base_id(t, i, s) for t, i, s in zip(bad["task"], bad["init"], bad["base_seed"])}
        )
    if excluded:
        accs = manifest.get("base_models", {})
        items = "".join(
            f"<li>{_esc(e)}"
            + (f" (composite accuracy {accs[e]:.3f})" if isinstance(accs.get(e), float) else "")
            + "</li>"
            for e in excluded
        )
        parts.append(
            "<p>Excluded base models (failed the composite task on validation data, or "
            "bypass the masks; left out of every verdict):</p>"
            f"<ul>{items}</ul>"
        )
    else:
        parts.append("<p>Excluded base models: none.</p>")
    for key in ("timings", "versions", "config"):
        if key in manifest:
            body = json.dumps(manifest[key], indent=2, sort_keys=True, default=str)
            parts.append(f"<details><summary>{key}</summary><pre>{_esc(body)}</pre></details>")
    return "".join(parts)


def section_accuracy(results: pd.DataFrame, margin: float) -> str:
    """Accuracy bars per (task, subroutine) and the sub/abl difference scatter per task."""
    out = []
    for task in sorted(results["task"].unique()):
        for sub in sorted(results.loc[results["task"] == task, "subroutine"].unique()):
            ok = plots.usable_rows(results)
            ok = ok[(ok["task"] == task) & (ok["subroutine"] == sub)]
            if ok.empty:
                out.append(_note(f"{task} / {sub}: no usable runs"))
                continue
            out.append(
                _fig(
                    plots.accuracy_bars(results, task, sub),
                    f"{task}, subroutine {sub}: accuracy on the target partition (only {sub} "
                    "decides) and the other partition of usable runs: mean over base models "
                    "with a Student-t 95% interval.",
                )
            )
        out.append(
            _fig(
                plots.diff_scatter(results, task, margin),
                "Each point is one run (base model x mask seed); green: compositional region.",
            )
        )
    return "".join(out)


def section_masks(freq: pd.DataFrame, results: pd.DataFrame | None = None) -> str:
    """Layer x head kept-frequency heatmaps per subroutine (one panel per init) and neurons."""
    if freq.empty:
        kinds = set(results["mask_kind"]) if results is not None and "mask_kind" in results else ()
        if kinds and kinds <= {"weight"}:
            return _note("weight masks: per-unit heatmaps need unit masks (mask_kind 'unit')")
        return _note("no readable mask files: mask heatmaps unavailable")
    out = []
    for (task, model, sub), g in freq.groupby(["task", "model", "subroutine"], sort=True):
        panels = []
        for init in plots.order_inits(g["init"].unique().tolist()):
            cell = g[g["init"] == init]
            if (cell["kind"] == "head").any():
                grid, layers = plots.head_grid(cell)
                panels.append((f"{init} ({int(cell['n_masks'].iloc[0])} masks)", grid, layers))
        if panels:
            out.append(
                _fig(
                    plots.heatmap_panels(panels, f"{task} / {model}: heads kept for {sub}"),
                    "Fraction of masks (mask seeds x base models) that keep each head.",
                )
            )
    if (freq["kind"] == "neuron").any():
        for task, g in freq.groupby("task", sort=True):
            if (g["kind"] == "neuron").any():
                out.append(
                    _fig(
                        plots.neuron_density(g, f"{task}: MLP neurons kept per layer"),
                        "Mean fraction of MLP neurons kept per layer.",
                    )
                )
    return "".join(out) or _note("masks hold no head or neuron units")


def section_overlap(overlap: pd.DataFrame) -> str:
    """Mean A/B overlap per (task, init, layer, kind) over base models x mask seeds."""
    if overlap.empty:
        return _note("no pair of readable A/B masks: overlap unavailable")
    ok = overlap[overlap["base_ok"]] if "base_ok" in overlap.columns else overlap
    keys = ["task", "model", "init", "subroutine_a", "subroutine_b", "layer", "kind"]
    agg = (
        ok.groupby(keys, sort=True)
        .agg(
            runs=("jaccard", "size"),
            n_units=("n_units", "first"),
            kept_a=("n_a", "mean"),
            kept_b=("n_b", "mean"),
            shared=("n_shared", "mean"),
            jaccard=("jaccard", "mean"),
        )
        .reset_index()
    )
    agg["layer"] = agg["layer"].map(lambda x: "all" if x == -1 else x)
    return (
        "<p>Units kept by the masks of both subroutines of one base model and mask seed "
        "(mean over runs; Jaccard = shared / union). Low overlap means the two subroutines "
        "use distinct units.</p>" + _table(agg, digits=2)
    )


def example_texts(task: Any, n: int, seed: int = 0) -> list[str]:
    """``n`` stimuli of a task (object or built-in name), cycling through predicate values."""
    if isinstance(task, str):
        from subroutine_circuits.tasks import get_task

        task = get_task(task)
    rng = random.Random(seed)
    preds = list(task.predicates)
    combos = [
        {p: bool((i >> j) & 1) for j, p in enumerate(preds[:2])} for i in range(2 ** len(preds[:2]))
    ]
    return [task.sample(combos[i % len(combos)], rng).text for i in range(n)]


def _task_object(name: str) -> Any:
    """A built-in task by name, or a user task from a .jsonl/.csv file path."""
    from subroutine_circuits.tasks import get_task, load_user_task

    if Path(name).suffix.lower() in (".jsonl", ".csv"):
        return load_user_task(name)
    return get_task(name)


def attention_patterns_of(
    model: Any, tokens: Int[Tensor, "pos"], heads: list[tuple[int, int]]
) -> list[np.ndarray]:
    """Attention patterns ``[dest, src]`` of ``heads`` ((layer, head) pairs) on one sequence."""
    import torch

    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one sequence [pos], got shape {tuple(tokens.shape)}")
    layers = sorted({layer for layer, _ in heads})
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    device = next(model.parameters()).device
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None].to(device), names_filter=lambda name: name in names
        )
    return [
        cache[f"blocks.{layer}.attn.hook_pattern"][0, h].float().cpu().numpy() for layer, h in heads
    ]


def _kept_heads(out_dir: Path, rows: pd.DataFrame) -> list[tuple[int, int, str]] | None:
    """(layer, head, subroutine) of heads kept by the masks in ``rows``; None if none readable."""
    kept, readable = [], False
    for _, r in rows.iterrows():
        p = stats.resolve_mask_path(out_dir, r.get("mask_path"))
        if p is None:
            continue
        try:
            flat, units = stats.load_mask_units(p)
        except (ValueError, OSError, RuntimeError):  # e.g. a weight mask: no units
            continue
        readable = True
        kept += [(u[0], u[2], r["subroutine"]) for u, k in zip(units, flat) if k and u[1] == "head"]
    return kept if readable else None


def _strip_source_map(src: str) -> str:
    """Drop ``//# sourceMappingURL=...`` comments (a devtools-only reference to a .map file)."""
    return "\n".join(
        line for line in src.splitlines() if not line.lstrip().startswith("//# sourceMappingURL")
    )


def section_attention(
    out_dir: Path, results: pd.DataFrame, manifest: dict[str, Any], cfg: ReportConfig
) -> str:
    """Attention patterns of the kept heads on a few example stimuli, one base model per init."""
    import torch

    from subroutine_circuits.models import load_checkpoint

    if not RunStore(out_dir).models_dir.is_dir():
        return _note("no models/ folder: attention patterns unavailable")
    out, widget_done = [], not cfg.circuitsvis
    for task in sorted(results["task"].unique()):
        task_name, task_obj = task, None
        texts: list[str] = []
        for name in (task, _find_key(manifest.get("config", {}), "task")):
            if not name:
                continue
            try:
                task_obj = _task_object(str(name))
                texts = example_texts(task_obj, cfg.n_examples, cfg.seed)
                task_name = str(name)
                break
            except Exception:  # unknown task or unreadable user file: try the next name
                continue
        if not texts:
            out.append(_note(f"{task}: no example stimuli could be drawn for attention patterns"))
            continue
        for init in plots.order_inits(results["init"].unique().tolist()):
            sel = results[(results["task"] == task) & (results["init"] == init)]
            sel = sel[sel["base_ok"]] if sel["base_ok"].any() else sel
            if sel.empty:
                continue
            seed = sorted(sel["base_seed"].unique())[0]
            mdir = RunStore(out_dir).model_dir(base_id(task, init, seed))
            if not (mdir / "meta.json").is_file():
                out.append(_note(f"{task} / {init}: checkpoint {mdir.name} not found"))
                continue
            rows = sel[sel["base_seed"] == seed]
            rows = rows[rows["mask_seed"] == sorted(rows["mask_seed"].unique())[0]]
            kept = _kept_heads(out_dir, rows)
            if kept is not None and not kept:
                out.append(_note(f"{task} / {init}: the masks keep no attention head"))
                continue
            model, tok, _ = load_checkpoint(mdir, device=cfg.device)
            by_head: dict[tuple[int, int], list[str]] = {}
            if kept is None:  # no unit masks (e.g. weight masks): show every head
                out.append(_note(f"{task} / {init}: no unit masks, showing all heads"))
                for la in range(model.cfg.n_layers):
                    for h in range(model.cfg.n_heads):
                        by_head[(la, h)] = ["all"]
            for layer, h, sub in kept or []:
                by_head.setdefault((layer, h), []).append(sub)
            heads = sorted(by_head)[: cfg.max_heads]
            labels = [f"L{la}H{h} ({'+'.join(by_head[(la, h)])})" for la, h in heads]
            if tok is None:
                tok = task_obj.tokenizer()
            for text in texts:
                ids = tok.encode(text)[: model.cfg.n_ctx]
                str_toks = [tok.decode([i], skip_special=False) or "?" for i in ids]
                pats = attention_patterns_of(model, torch.tensor(ids), heads)
                title = f"{task_name} / {init} s{seed}: {text}"
                out.append(_fig(plots.attention_heatmaps(pats, labels, str_toks, title)))
                if not widget_done:
                    import circuitsvis.attention as cva

                    src = cva.attention_patterns(
                        tokens=str_toks, attention=torch.tensor(np.stack(pats))
                    ).local_src
                    out.append(
                        f"<p>Interactive view (circuitsvis, inlined; heads in order: "
                        f"{_esc(', '.join(labels))})</p>{CV_BEGIN}{_strip_source_map(src)}{CV_END}"
                    )
                    widget_done = True
    return "".join(out) or _note("no attention patterns to show")


def _load_score_files(out_dir: Path) -> list[dict[str, Any]]:
    """Per-unit patching score files ``patching/*.pt`` that follow the documented format."""
    import torch

    found = []
    pdir = RunStore(out_dir).patching_dir
    files = sorted(pdir.rglob("*.pt")) if pdir.is_dir() else []
    files += sorted(out_dir.glob("scores_*.pt"))
    for p in files:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception:
            continue
        if isinstance(obj, dict) and "scores" in obj and "units" in obj:
            obj = dict(obj)
            obj["_file"] = p.name
            found.append(obj)
    return found


def _patching_table(df: pd.DataFrame) -> pd.DataFrame:
    """patching.csv averaged per (task, init, subroutine, method), with the row count ``n``."""
    keys = [c for c in ("task", "init", "subroutine", "method") if c in df.columns]
    if not keys:
        raise ValueError("patching.csv has none of the columns task, init, subroutine, method")
    metrics = [
        c
        for c in ("k", "mask_k", "jaccard", "spearman", "roc_auc", "cpr", "cmd", "f_k")
        + ("k_faithful", "f_faithful", "abl_target_acc", "abl_other_acc", "abl_diff")
        if c in df.columns
    ]
    num = df[keys].copy()
    for c in metrics:
        num[c] = pd.to_numeric(df[c], errors="coerce")
    agg = num.groupby(keys, sort=True)[metrics].mean().reset_index()
    agg.insert(len(keys), "n", df.groupby(keys, sort=True).size().to_numpy())
    return agg


def _method_panels(method: str, ss: list[dict]) -> tuple[list, list[dict], list[dict]]:
    """Heatmap panel of one method's mean |score| per head, its accuracy curves and its MIB
    faithfulness curves (one per score file)."""
    panels, curves, mib = [], [], []
    tab = pd.DataFrame(
        [u + (float(v),) for s in ss for u, v in zip(s["units"], np.asarray(s["scores"]))],
        columns=["layer", "kind", "index", "score"],
    )
    tab["freq"] = tab["score"].abs()
    tab = tab.groupby(["layer", "kind", "index"], as_index=False)["freq"].mean()
    if (tab["kind"] == "head").any():
        grid, layers = plots.head_grid(tab)
        top = np.nanmax(grid)
        panels.append((f"{method}: |score| / max", grid / top if top > 0 else grid, layers))
    for s in ss:
        label = f"{method} s{s.get('base_seed', '?')}"
        f = s.get("faithfulness")
        if (
            isinstance(f, dict)
            and {"k", "target_acc", "other_acc"} <= set(f)
            and np.atleast_1d(f["k"]).size >= 2  # a curve needs two sizes at least
        ):
            curves.append(dict(f, label=label))
        c = s.get("curve")
        if isinstance(c, dict) and {"fractions", "faithfulness"} <= set(c):
            mib.append(dict(c, label=label))
    return panels, curves, mib


def _patching_cell(cell: tuple, items: list[dict], freq: pd.DataFrame) -> list[str]:
    """Figures of one (task, init, subroutine): mask vs patching heatmaps, accuracy curves,
    faithfulness curves."""
    task, init, sub = cell
    panels: list = []
    m = (
        freq[(freq["task"] == task) & (freq["init"] == init) & (freq["subroutine"] == sub)]
        if not freq.empty
        else freq
    )
    if not m.empty and (m["kind"] == "head").any():
        grid, layers = plots.head_grid(m)
        panels.append(("mask: kept frequency", grid, layers))
    methods: dict[str, list[dict]] = {}
    for s in items:
        methods.setdefault(str(s.get("method", "patching")), []).append(s)
    curves: list[dict] = []
    mib: list[dict] = []
    for method, ss in sorted(methods.items()):
        p, c, f = _method_panels(method, ss)
        panels, curves, mib = panels + p, curves + c, mib + f
    where = " / ".join(str(x) for x in (task, init) if x is not None)
    where = f"{where}: {sub}" if where else str(sub)
    out = []
    if panels:
        has_mask = panels[0][0].startswith("mask")
        out.append(
            _fig(
                plots.heatmap_panels(panels, f"{where}, mask vs patching", "value"),
                ("Left: how often masks keep each head; right: " if has_mask else "")
                + "normalised |patching score| per head.",
            )
        )
    if curves:
        out.append(
            _fig(
                plots.faithfulness_curves(curves, where),
                "Accuracy after ablating the top-k patching units: target falls, other "
                "should stay.",
            )
        )
    if mib:
        out.append(
            _fig(
                plots.circuit_faithfulness(mib, where),
                "Faithfulness of the top-scoring circuit as a function of its size "
                "(1 = full model, 0 = everything ablated).",
            )
        )
    return out


def _pair_shortage_notes(df: pd.DataFrame) -> list[str]:
    """One sentence per patching.csv row group (task, init, base seed, subroutine) that had
    fewer minimal pairs than asked (``status``: ``fewer pairs``) or none (``skipped``)."""
    if "status" not in df.columns:
        return []
    notes = []
    keys = [c for c in ("task", "init", "base_seed", "subroutine") if c in df.columns]
    thin = df[df["status"].isin(["fewer pairs", "skipped"])].drop_duplicates(keys)
    for _, r in thin.iterrows():
        where = ", ".join(f"{k} {r[k]}" for k in keys if k != "subroutine")
        found = (
            f"{int(r['n_pairs'])} of {int(r['n_pairs_asked'])} scoring and "
            f"{int(r['n_faith_pairs'])} of {int(r['n_faith_pairs_asked'])} faithfulness "
            "minimal pairs"
        )
        why = f" ({r['pairs_note']})" if isinstance(r.get("pairs_note"), str) else ""
        what = (
            "patching skipped: too few minimal pairs in the data"
            if r["status"] == "skipped"
            else "patching ran with fewer minimal pairs than asked"
        )
        notes.append(_note(f"{r['subroutine']} ({where}): {what}, {found}{why}."))
    return notes


def section_patching(out_dir: Path, freq: pd.DataFrame) -> str:
    """Mask vs activation-patching comparison: table, side-by-side heatmaps, faithfulness."""
    path = RunStore(out_dir).patching_csv
    if not path.is_file():
        return _note("no patching.csv: patching comparison not run")
    df = pd.read_csv(path)
    if df.empty:
        return _note("patching.csv has no rows")
    shortage = _pair_shortage_notes(df)
    if "status" in df.columns:
        df = df[df["status"] != "skipped"]  # nothing was patched: no measure to average
    out = [
        "<p>Mask subnetwork vs patching circuit of the same subroutine (mean over base "
        "models): Jaccard at matched size k, Spearman rank correlation and ROC AUC of patching "
        "scores against the mask, faithfulness (cpr, cmd) and the target/other accuracy after "
        "ablating the patching circuit.</p>",
        *shortage,
        _table(_patching_table(df)) if not df.empty else "",
    ]
    scores = _load_score_files(out_dir)
    if not scores:
        out.append(_note("no per-unit score files under patching/: heatmaps unavailable"))
        return "".join(out)
    by_cell: dict[tuple, list[dict]] = {}
    for s in scores:
        cell = (s.get("task"), s.get("init"), s.get("subroutine"))
        by_cell.setdefault(cell, []).append(s)
    for cell, items in sorted(by_cell.items(), key=lambda kv: str(kv[0])):
        out += _patching_cell(cell, items, freq)
    return "".join(out)


# ----------------------------------------------------------------------------- page


def _section(title: str, anchor: str, build: Callable[[], str], problems: list[str]) -> str:
    """Run one section builder; an exception becomes a visible note (and is recorded)."""
    try:
        body = build()
    except Exception as e:  # a broken optional input must not take the whole report down
        problems.append(f"{title}: {type(e).__name__}: {e}")
        tb = traceback.format_exc(limit=3)
        body = _note(f"section unavailable: {type(e).__name__}: {e}") + (
            f"<details><summary>details</summary><pre>{_esc(tb)}</pre></details>"
        )
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>{body}</section>'


def render_report(out_dir: str | os.PathLike, cfg: ReportConfig | None = None) -> tuple[str, list]:
    """Build the report page; returns ``(html_text, problems)`` (problems: failed sections)."""
    cfg = cfg or ReportConfig()
    out_dir = Path(out_dir)
    results = stats.load_results(out_dir)
    manifest = stats.load_manifest(out_dir)
    margin = float(manifest.get("margin", stats.DEFAULT_MARGIN))
    problems: list[str] = []
    try:
        freq = stats.kept_frequency(out_dir)
    except Exception as e:
        problems.append(f"mask frequencies: {type(e).__name__}: {e}")
        freq = pd.DataFrame()
    from subroutine_circuits.report import verdicts as rv
    from subroutine_circuits.report.frontier import section_frontier

    sections = [
        ("Run summary", "run", lambda: section_run(manifest, results)),
        ("Verdicts", "verdicts", lambda: rv.section_verdicts(out_dir, results, margin)),
        ("Bypass check", "bypass", lambda: rv.section_bypass(manifest)),
        ("Accuracy by condition", "accuracy", lambda: section_accuracy(results, margin)),
        (
            "Mask density per unit kind",
            "density",
            lambda: rv.section_densities(out_dir, results, margin),
        ),  # fmt: skip
        ("Mask heatmaps", "masks", lambda: section_masks(freq, results)),
        ("A/B mask overlap", "overlap", lambda: section_overlap(stats.overlap_table(out_dir))),
        (
            "Attention patterns of kept heads",
            "attention",
            lambda: section_attention(out_dir, results, manifest, cfg),
        ),
        ("Mask vs activation patching", "patching", lambda: section_patching(out_dir, freq)),
        ("Mask vs patching per unit kind", "agreement", lambda: rv.section_agreement(out_dir)),
        ("Faithfulness-size frontier", "frontier", lambda: section_frontier(out_dir)),
    ]
    if vision.is_cnn_experiment(manifest):  # image tasks on CNNs: report/vision.py
        sections = [s for s in sections if s[1] != "attention"]  # no attention in a CNN
        stimuli = ("Stimuli and base models", "stimuli",
                   lambda: vision.section_stimuli(out_dir, manifest))  # fmt: skip
        channels = ("Channel heatmaps", "channels",
                    lambda: vision.section_channel_masks(out_dir, freq, manifest))  # fmt: skip
        sections = [sections[0], stimuli, *sections[1:4], channels, *sections[4:]]
    body = "".join(_section(t, a, b, problems) for t, a, b in sections)
    nav = " | ".join(f'<a href="#{a}">{_esc(t)}</a>' for t, a, _ in sections)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Structural compositionality report: {_esc(out_dir.name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Structural compositionality report</h1><p>{_esc(out_dir.resolve())}</p>"
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )
    return page, problems


def build_report(out_dir: str | os.PathLike, cfg: ReportConfig | None = None) -> Path:
    """Write ``OUT/report.html`` (atomically) for an experiment folder and return its path.

    Needs ``results.csv``; ``manifest.json``, masks, model checkpoints and ``patching.csv`` /
    ``patching/*.pt`` are used when present. Per-unit patching score files are read when they are
    dicts with ``scores`` (one value per unit), ``units`` ((layer, kind, index) per unit), and
    ``task``, ``init``, ``subroutine``, ``method``, ``base_seed``; an optional ``faithfulness``
    dict with lists ``k``, ``target_acc``, ``other_acc`` gives an ablation-accuracy curve and an
    optional ``curve`` dict with lists ``fractions``, ``faithfulness`` a faithfulness curve.
    They are looked for under ``OUT/patching/`` (recursively) and as ``OUT/scores_*.pt``.
    """
    page, _ = render_report(out_dir, cfg)
    path = RunStore(out_dir).report_path
    atomic_write_text(path, page)
    return path
