"""Report sections of the vision path (CNN experiments on shape-world tasks).

- :func:`section_stimuli`: generated problems of every kind (inline SVG with embedded PNG data
  URIs, every image captioned with its predicate values and object count, the odd one framed
  in red) and minimal pairs per predicate (clean | corrupted), plus the base models' training
  record (validation / test composite accuracy, exclusion, bypass check, compute).
- :func:`section_channel_masks`: per subroutine, one heatmap per init of how often each channel
  of each conv hook (stem, every block's hidden channels) is kept across masks.

Both return a note for experiments that are not CNN experiments.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subroutine_circuits.report import plots

N_PAIRS = 2


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def is_cnn_experiment(manifest: dict[str, Any]) -> bool:
    """Whether the manifest's config is a CNN (``[model] family = "cnn"``) experiment."""
    cfg = manifest.get("config") if isinstance(manifest, dict) else None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return isinstance(model, dict) and model.get("family") == "cnn"


def _task(manifest: dict[str, Any]):
    from subroutine_circuits.tasks.vision import vision_task

    cfg = manifest["config"]
    return vision_task(cfg["task"], image_size=cfg["model"].get("image_size"), rule=cfg.get("rule"))


def _png_img(image: np.ndarray, alt: str) -> str:
    """An ``<img>`` with a PNG data URI."""
    from subroutine_circuits.tasks.vision import encode_png

    data = base64.b64encode(encode_png(image)).decode()
    return (f'<img alt="{html.escape(alt)}" style="image-rendering:pixelated" '
            f'src="data:image/png;base64,{data}">')  # fmt: skip


def pairs_html(task: Any, seed: int = 0, scale: int = 3) -> str:
    """Per predicate, ``N_PAIRS`` minimal pairs: clean (breaks the predicate) | corrupted."""
    from subroutine_circuits.tasks.vision.render import _upscale

    rows = []
    for p in task.predicates:
        pairs = task.make_minimal_pairs(p, N_PAIRS, seed=seed, split="report")
        for i in range(len(pairs)):
            vals = [dict(zip(pairs.predicates, v)) for v in
                    (pairs.clean_values[i], pairs.corrupted_values[i])]  # fmt: skip
            cells = []
            for img, v, name in ((pairs.clean[i], vals[0], "clean"),
                                 (pairs.corrupted[i], vals[1], "corrupted")):  # fmt: skip
                cap = ", ".join(f"{k}={'T' if b else 'F'}" for k, b in v.items())
                cells.append(f"<td>{_png_img(_upscale(img, scale), name)}<br>{name}: "
                             f"{html.escape(cap)}</td>")  # fmt: skip
            rows.append(f"<tr><td>{html.escape(p)}</td>{''.join(cells)}</tr>")
    return ("<table><tr><th>flipped predicate</th><th>clean</th><th>corrupted</th></tr>"
            + "".join(rows) + "</table>")  # fmt: skip


def base_model_table(out_dir: Path) -> pd.DataFrame:
    """One row per CNN base model (``models/*/meta.json``): accuracies, exclusion, bypass
    check and compute."""
    rows = []
    for meta_path in sorted((Path(out_dir) / "models").glob("*/meta.json")):
        m = json.loads(meta_path.read_text())
        c = m.get("compute", {})
        # keys of this version's meta.json first, then the names older versions wrote
        bypass = (m.get("bypass_check") or {}).get("accuracies", {}).get("composite")
        rows.append({
            "base model": meta_path.parent.name, "init": m.get("init"),
            "val composite": m.get("composite_val_acc", m.get("val_composite_acc")),
            "test composite": m.get("composite_acc"),
            "bypass acc (all ablated)": bypass if bypass is not None else m.get("bypass_acc"),
            "SimCLR steps": c.get("pretrain_steps"), "SimCLR s": c.get("pretrain_seconds"),
            "fine-tune steps": c.get("train_steps"), "fine-tune s": c.get("train_seconds"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def section_stimuli(out_dir: str | Path, manifest: dict[str, Any]) -> str:
    """Generated stimuli of the experiment's image task, minimal pairs and the base models."""
    from subroutine_circuits.tasks.vision import problems_svg

    if not is_cnn_experiment(manifest):
        return _note("not a CNN experiment: no image stimuli")
    task = _task(manifest)
    out = [f"<p>{html.escape(task.description)} Images of {task.image_size} px; the odd image "
           "is framed in red; captions give each image's predicate values (measured on its "
           "own raster) and object count.</p>"]  # fmt: skip
    for kind in task.problem_kinds():
        probs = task.make_problems(kind, 1, seed=7, image_size=task.image_size)
        out.append(f'<figure class="fig">{problems_svg(probs, n=1).decode()}</figure>')
    out.append("<h3>Minimal pairs (patching)</h3>" + pairs_html(task))
    table = base_model_table(Path(out_dir))
    if len(table):
        excluded = manifest.get("excluded_base_models", [])
        names = html.escape(", ".join(excluded) or "none")
        threshold = manifest.get("min_composite_acc", 0.9)
        out.append(
            f"<h3>Base models</h3><p>Excluded (validation composite accuracy below {threshold}):"
            f" {names}. With every unit ablated the accuracy must be at chance (0.25): no path "
            "bypasses the masks.</p>"
        )
        out.append(table.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
    return "".join(out)


# ----------------------------------------------------------------------------- channel masks


def hook_labels(out_dir: Path, freq: pd.DataFrame) -> dict[int, str]:
    """Layer ordinal -> hook name (``stem``, ``s{stage}b{block}``, ``...h2``) from a checkpoint's
    config (empty when none can be read)."""
    import torch

    from subroutine_circuits.models.cnn import CNNConfig, HookedCNN, cnn_layer_table

    for cfg_path in sorted((Path(out_dir) / "models").glob("*/config.json")):
        d = json.loads(cfg_path.read_text())
        if d.get("model_class") != "HookedCNN":
            continue
        cfg = CNNConfig.from_dict({**d["cfg"], "device": "meta"})
        with torch.device("meta"):
            model = HookedCNN(cfg)
        labels = {}
        for r in cnn_layer_table(model):
            name = r["hook_name"]
            if r["stage"] < 0:
                labels[r["layer"]] = name.split(".")[0]
            else:
                suffix = "h2" if name.endswith("hidden2") else ""
                labels[r["layer"]] = f"s{r['stage']}b{r['block']}{suffix}"
        return labels
    return {}


def channel_grid(cell: pd.DataFrame) -> tuple[np.ndarray, list[int]]:
    """A (conv hook) x channel array of kept frequencies (NaN past a hook's width)."""
    ch = cell[cell["kind"] == "channel"]
    layers = sorted(int(x) for x in ch["layer"].unique())
    grid = np.full((len(layers), int(ch["index"].max()) + 1), np.nan)
    for layer, idx, f in zip(ch["layer"], ch["index"], ch["freq"]):
        grid[layers.index(int(layer)), int(idx)] = f
    return grid, layers


def channel_heatmaps(panels: list[tuple[str, np.ndarray, list[str]]], title: str) -> str:
    """Side-by-side hook x channel heatmaps (one per init)."""
    plt = plots._plt()
    n_rows = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 0.28 * n_rows + 1.6),
                             squeeze=False)  # fmt: skip
    im = None
    for ax, (name, grid, labels) in zip(axes[0], panels):
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                       interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xlabel("channel", fontsize=7)
        ax.set_title(name, fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="kept frequency")
    fig.suptitle(title, fontsize=9)
    return plots.fig_to_svg(fig)


def section_channel_masks(out_dir: str | Path, freq: pd.DataFrame,
                          manifest: dict[str, Any]) -> str:  # fmt: skip
    """Kept frequency of every channel per conv hook (rows, in forward order: the stem, then
    each block's hidden channels), one panel per init, one figure per subroutine."""
    if not is_cnn_experiment(manifest):
        return _note("not a CNN experiment: no channel masks")
    if freq.empty or not (freq["kind"] == "channel").any():
        return _note("no readable channel masks: channel heatmaps unavailable")
    labels = hook_labels(Path(out_dir), freq)
    out = []
    for (task, model, sub), g in freq.groupby(["task", "model", "subroutine"], sort=True):
        panels = []
        for init in plots.order_inits(g["init"].unique().tolist()):
            cell = g[g["init"] == init]
            if (cell["kind"] == "channel").any():
                grid, layers = channel_grid(cell)
                names = [labels.get(x, f"L{x}") for x in layers]
                panels.append((f"{init} ({int(cell['n_masks'].iloc[0])} masks)", grid, names))
        if panels:
            svg = channel_heatmaps(panels, f"{task} / {model}: channels kept for {sub}")
            out.append(f'<figure class="fig">{svg}<figcaption>Fraction of masks (mask seeds x '
                       "base models) keeping each channel; rows: the stem and every block's "
                       "hidden channels (s = stage, b = block); the head's neurons are in the "
                       "mask heatmaps above.</figcaption></figure>")  # fmt: skip
    return "".join(out) or _note("masks hold no channel units")
