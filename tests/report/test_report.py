"""Tests of report.html: built from a synthetic experiment folder with real masks and checkpoints.

The folder has a fake results.csv and manifest (from test_summary.make_experiment), masks written
with the real ``save_mask`` on a tiny model, tiny model checkpoints with the task tokenizer, and a
patching.csv with per-unit score files. The page must contain every plot and table, and must not
reference anything on the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_transformer
from experiment_fixtures import make_experiment

from subroutine_circuits.adapters import tl_unit_map
from subroutine_circuits.report import build_report
from subroutine_circuits.report import html as rhtml

TASK = "agreement_singular"
INITS = ("trained", "random_init")
N_EXAMPLES = 2
SUBS = ("subject_plural", "verb_plural")

# ----------------------------------------------------------------------------- offline check

# Namespace declarations are identifiers, not fetches: a browser never requests them.
_NAMESPACE_DECL = re.compile(
    r'\sxmlns(:\w+)?="http://www\.w3\.org/(2000/svg|1999/xlink|1999/xhtml)"'
)
# URLs that occur as plain strings in circuitsvis's inlined bundle (React/TF.js error messages,
# code comments, DOM namespace constants). None is passed to fetch/src/href/import: see the
# patterns below, which must not match anywhere in the bundle.
_BUNDLE_URL_ALLOWLIST = {
    "http://www.w3.org/1999/xhtml",
    "http://www.w3.org/2000/svg",
    "http://www.w3.org/1999/xlink",
    "http://www.w3.org/XML/1998/namespace",
    "http://www.w3.org/1998/Math/MathML",
    "http://fb.me/use-check-prop-types",
    "https://reactjs.org/docs/error-decoder.html?invariant=",
    "https://developer.mozilla.org/en-US/docs/Web/API/Fetch_API",
    "https://github.com/tensorflow/tfjs-node",
    "https://github.com/tensorflow/tfjs/issues/1735",
    "https://github.com/tensorflow/tfjs/issues/5447",
    "https://www.shadertoy.com/view/4djSRW",
    "https://arxiv.org/abs/1706.02515",
}
# Anything that would make a browser load a resource from elsewhere.
_FETCH_PATTERNS = [
    re.compile(r"<script[^>]*\bsrc\s*=", re.I),
    re.compile(r"<link\b", re.I),
    re.compile(r"<iframe\b", re.I),
    re.compile(r"@import", re.I),
    re.compile(r"""url\(\s*['"]?\s*(https?:)?//""", re.I),
    re.compile(r"""\b(src|href|action|poster|data)\s*=\s*['"]?\s*(https?:)?//""", re.I),
    re.compile(r"""\b(fetch|import|importScripts)\s*\(\s*['"`]\s*(https?:)?//""", re.I),
    re.compile(r"""\.(src|href)\s*=\s*['"`]\s*(https?:)?//""", re.I),
    re.compile(r"sourceMappingURL", re.I),
    re.compile(r"new\s+(WebSocket|EventSource)\s*\(", re.I),
]
_URL = re.compile(r"""https?://[^\s"'`<>)\\]*""")


def split_circuitsvis(page: str) -> tuple[str, list[str]]:
    """(page without circuitsvis blocks, the blocks)."""
    pat = re.compile(re.escape(rhtml.CV_BEGIN) + r"(.*?)" + re.escape(rhtml.CV_END), re.S)
    return pat.sub("", page), pat.findall(page)


def network_references(page: str) -> list[str]:
    """Every network reference of a page (empty for an offline page).

    Outside the circuitsvis blocks no URL may occur at all once the SVG namespace declarations
    are removed. Inside a block, no fetching construct may occur and the only URLs are the
    allow-listed literal strings of the bundle.
    """
    rest, blocks = split_circuitsvis(page)
    problems = []
    rest = _NAMESPACE_DECL.sub("", rest)
    problems += [f"url: {u}" for u in _URL.findall(rest)]
    for text, where in [(rest, "page")] + [(b, "circuitsvis") for b in blocks]:
        for pat in _FETCH_PATTERNS:
            problems += [f"{where}: {m.group(0)}" for m in pat.finditer(text)]
    for b in blocks:
        problems += [f"circuitsvis url: {u}" for u in set(_URL.findall(b)) - _BUNDLE_URL_ALLOWLIST]
    return problems


def test_network_check_catches_remote_references():
    """The checker itself flags each kind of remote reference (and passes namespace decls)."""
    ok = '<svg xmlns="http://www.w3.org/2000/svg"><image xlink:href="data:image/png;base64,AA"/>'
    assert network_references(ok) == []
    for bad in (
        '<script src="https://cdn.example/x.js"></script>',
        '<img src="//example.org/a.png">',
        '<link rel="stylesheet" href="a.css">',
        "<style>@import url(https://fonts.example/f.css);</style>",
        '<div style="background: url(http://x/y.png)"></div>',
        '<a href="https://example.org">x</a>',
        f'{rhtml.CV_BEGIN}<script>fetch("https://evil.example/x")</script>{rhtml.CV_END}',
        f"{rhtml.CV_BEGIN}<script>var u='https://new.example/'</script>{rhtml.CV_END}",
    ):
        assert network_references(bad), bad


# ----------------------------------------------------------------------------- fixture


def _write_real_masks(out: Path, results: pd.DataFrame) -> dict[str, np.ndarray]:
    """Overwrite every mask of results.csv with a real UnitMask saved by save_mask."""
    from subroutine_circuits.masks import UnitMask, save_mask

    model = make_tiny_transformer(seed=0, d_vocab=50)
    unit_map = tl_unit_map(model)
    rng = np.random.default_rng(5)
    flats = {}
    for rel in results["mask_path"]:
        flat = rng.random(unit_map.n_units) < 0.3
        flat[0] = True  # every mask keeps L0H0, so the attention section always has a head
        mask = UnitMask.fixed(unit_map, torch.as_tensor(flat))
        save_mask(out / rel, mask, model, {"note": "test fixture"})
        flats[rel] = flat
    return flats


def _write_checkpoints(out: Path) -> None:
    """Tiny model checkpoints with the task tokenizer for base seed 0 of each init."""
    from subroutine_circuits.models import save_checkpoint
    from subroutine_circuits.tasks import get_task

    tok = get_task(TASK).tokenizer()
    for i, init in enumerate(INITS):
        model = make_tiny_transformer(seed=10 + i, d_vocab=tok.vocab_size)
        save_checkpoint(out / "models" / f"{TASK}__{init}__s0", model, tok, {"init": init})


def _write_patching(out: Path, units: list[tuple[int, str, int]], keep: np.ndarray) -> None:
    """patching.csv rows and per-unit score files in the format build_report documents (the
    score file's agreement table compares its scores with the mask ``keep``)."""
    from subroutine_circuits.analysis.inference import agreement_table

    rows = []
    for init in INITS:
        for seed in range(2):
            for sub in SUBS:
                rows.append(
                    dict(subroutine=sub, method="activation", k=5, jaccard=0.2 + 0.1 * seed,
                         spearman=0.4, roc_auc=0.7, cpr=0.8, cmd=0.1, abl_target_acc=0.3,
                         abl_other_acc=0.9, init=init, base_seed=seed, task=TASK)
                )  # fmt: skip
    pd.DataFrame(rows).to_csv(out / "patching.csv", index=False)
    g = torch.Generator().manual_seed(0)
    (out / "patching").mkdir()
    obj = {
        "scores": torch.randn(len(units), generator=g),
        "units": units,
        "task": TASK,
        "init": "trained",
        "subroutine": SUBS[0],
        "method": "activation",
        "base_seed": 0,
        "faithfulness": {"k": [0, 2, 4], "target_acc": [0.9, 0.5, 0.3], "other_acc": [0.9] * 3},
        "curve": {"fractions": [0.0, 0.1, 0.5, 1.0], "faithfulness": [0.0, 0.4, 0.8, 1.0]},
    }
    obj["agreement"] = agreement_table(
        keep, obj["scores"].numpy(), [u[0] for u in units], [u[1] for u in units], n_perm=200
    ).to_dict("records")
    torch.save(obj, out / "patching" / f"{TASK}__trained__s0__{SUBS[0]}__activation.pt")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Build the full synthetic folder once and render its report."""
    out = tmp_path_factory.mktemp("exp")
    results = make_experiment(out, inits=INITS, n_base=3, n_mask=1, task=TASK)
    flats = _write_real_masks(out, results)
    _write_checkpoints(out)
    from subroutine_circuits.masks import load_mask

    first = results[(results["init"] == "trained") & (results["subroutine"] == SUBS[0])]
    first = first[first["base_seed"] == 0]["mask_path"].iloc[0]
    units = load_mask(out / first).unit_map.units()
    _write_patching(out, units, flats[first])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bypass_check"] = {
        f"{TASK}__{init}__s{s}": {"composite": 0.26, "partition_a": 0.24, "bypass": False}
        for init in INITS
        for s in range(3)
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    cfg = rhtml.ReportConfig(n_examples=N_EXAMPLES, max_heads=3)
    path = build_report(out, cfg)
    page = path.read_text(encoding="utf-8")
    return {"out": out, "results": results, "flats": flats, "page": page, "path": path}


# ----------------------------------------------------------------------------- tests


def test_report_written_and_complete(report):
    assert "section unavailable" not in report["page"]  # every section was built
    path = report["path"]
    assert path == report["out"] / "report.html" and path.is_file()
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    rest, blocks = split_circuitsvis(page)
    # figures: accuracy bars per subroutine (2) + scatter (1) + head heatmaps per subroutine (2)
    # + neuron density (1) + attention (2 inits x N_EXAMPLES) + patching heatmap (1)
    # + ablation-accuracy curve (1) + faithfulness curve (1)
    expected = 2 + 1 + 2 + 1 + len(INITS) * N_EXAMPLES + 1 + 1 + 1
    assert rest.count("<svg") == expected
    assert len(blocks) == 1  # one interactive circuitsvis widget
    anchors = ("run", "verdicts", "bypass", "accuracy", "density", "masks", "overlap")
    for anchor in (*anchors, "attention", "patching", "agreement"):
        assert f'<section id="{anchor}">' in page
    assert "section unavailable" not in page


def test_report_is_offline(report):
    assert network_references(report["page"]) == []
    _, blocks = split_circuitsvis(report["page"])
    # the widget's script is inline (its JS bundle is in the page) and renders our patterns
    assert "<script" in blocks[0] and "CircuitsVis.render" in blocks[0]
    assert len(blocks[0]) > 100_000


def _cell(page: str, init: str, sub: str) -> str:
    """The verdict-table row of one cell (its <td> cells after init and subroutine)."""
    m = re.search(rf"<td>{init}</td>\s*<td>{sub}</td>(.*?)</tr>", page, re.S)
    assert m, (init, sub)
    return m.group(1)


def test_verdict_table_matches_results(report):
    """Base-model counts, their exact interval and the t interval of sub_diff, by hand."""
    from scipy.stats import beta
    from scipy.stats import t as t_dist

    page, res = report["page"], report["results"]
    for init in INITS:
        for sub in SUBS:
            g = res[(res["init"] == init) & (res["subroutine"] == sub) & res["base_ok"]]
            g = g[g["mask_ok"]]
            comp = (g["sub_diff"] > 0.05) & (g["abl_diff"] < -0.05) & (g["randabl_p"] < 0.05)
            per_base = comp.groupby(g["base_seed"]).mean()
            n, k = len(per_base), int((per_base > 0.5).sum())
            lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
            hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
            row = _cell(page, init, sub)
            assert f"<td>{k}/{n} [{lo:.2f}, {hi:.2f}]</td>" in row
            assert f"<td>{int(comp.sum())}/{len(g)}</td>" in row
            means = g.groupby("base_seed")["sub_diff"].mean()
            half = t_dist.ppf(0.975, n - 1) * means.std(ddof=1) / np.sqrt(n)
            m = means.mean()
            assert f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]" in row
    # the failed base model is listed in the run summary, counted in its cell
    assert f"{TASK}__trained__s2" in page
    assert re.search(r"<td>1 / 0</td>", _cell(page, "trained", SUBS[0]))
    # the removed Fisher tests and clustered bootstrap "CIs" (the per-run bootstrap over test
    # problems of issue 22 is another thing)
    assert "Fisher" not in page and "bootstrap CI" not in page and "cluster bootstrap" not in page
    assert "p (Holm)" in page


def test_densities_and_agreement_sections(report):
    """Share of heads kept (from the real masks) and the per-kind agreement with its null."""
    page, res, flats = report["page"], report["results"], report["flats"]
    from subroutine_circuits.masks import load_mask

    g = res[(res["init"] == "trained") & (res["subroutine"] == SUBS[0]) & res["base_ok"]]
    units = load_mask(report["out"] / g["mask_path"].iloc[0]).unit_map.units()
    heads = np.array([u[1] == "head" for u in units])
    share = np.mean([flats[p][heads].mean() for p in g["mask_path"]])
    section = page[page.index('<section id="density">') :]
    section = section[: section.index("</section>")]
    assert f"{100 * share:.1f}%" in section
    agree = page[page.index('<section id="agreement">') :]
    agree = agree[: agree.index("</section>")]
    assert "jaccard_null" in agree and "baseline_auc" in agree
    from subroutine_circuits.analysis.inference import expected_jaccard

    k = int(flats[g["mask_path"].iloc[0]][heads].sum())
    assert f"{expected_jaccard(int(heads.sum()), k, k):.2f}" in agree
    bypass = page[page.index('<section id="bypass">') :]
    assert "No base model bypasses the masks" in bypass[: bypass.index("</section>")]


def test_overlap_table_in_report(report):
    """The overall Jaccard of trained base-ok runs, computed from the masks, appears in the page."""
    res, flats = report["results"], report["flats"]
    vals = []
    ok = res[(res["init"] == "trained") & res["base_ok"]]
    for (_, _), g in ok.groupby(["base_seed", "mask_seed"]):
        a, b = (flats[p] for p in g.sort_values("subroutine")["mask_path"])
        vals.append((a & b).sum() / (a | b).sum())
    row = rf"<td>trained</td>\s*<td>{SUBS[0]}</td>\s*<td>{SUBS[1]}</td>\s*<td>all</td>"
    m = re.search(row + r"(\s*<td>[^<]*</td>){6}\s*<td>([^<]*)</td>", report["page"])
    assert m, "overall overlap row of trained runs missing"
    assert float(m.group(2)) == pytest.approx(np.mean(vals), abs=0.006)


def test_attention_patterns_of_matches_cache(tiny_model, tiny_tokens):
    heads = [(0, 1), (1, 3)]
    pats = rhtml.attention_patterns_of(tiny_model, tiny_tokens[0], heads)
    _, cache = tiny_model.run_with_cache(tiny_tokens[:1])
    for (layer, h), p in zip(heads, pats):
        ref = cache[f"blocks.{layer}.attn.hook_pattern"][0, h].numpy()
        assert np.allclose(p, ref)
        assert np.allclose(p.sum(-1), 1.0, atol=1e-5)
        assert np.allclose(np.triu(p, 1), 0.0)  # causal
    with pytest.raises(ValueError, match="one sequence"):
        rhtml.attention_patterns_of(tiny_model, tiny_tokens, heads)


def test_report_without_optional_pieces(tmp_path):
    """Only results.csv: every optional section shows a note, nothing crashes, still offline."""
    res = make_experiment(None, inits=("trained",), n_base=2, n_mask=2)
    res.to_csv(tmp_path / "results.csv", index=False)  # masks, manifest, models absent
    cfg = rhtml.ReportConfig()
    path = build_report(tmp_path, cfg)
    assert path.is_file()
    page = path.read_text(encoding="utf-8")
    assert "section unavailable" not in page
    assert "no readable mask files" in page
    assert "no models/ folder" in page
    assert "no patching.csv" in page
    assert page.count("<svg") == 2 + 1  # accuracy bars per subroutine + scatter
    assert network_references(page) == []


def test_broken_optional_input_becomes_note(tmp_path):
    make_experiment(tmp_path, inits=("trained",), n_base=1, n_mask=1)
    pd.DataFrame({"foo": [1]}).to_csv(tmp_path / "patching.csv", index=False)
    page, problems = rhtml.render_report(tmp_path, rhtml.ReportConfig())
    assert len(problems) == 1 and problems[0].startswith("Mask vs activation patching")
    assert "section unavailable" in page


def test_report_needs_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.csv"):
        build_report(tmp_path)


def test_report_with_weight_masks(tmp_path):
    """Weight masks have no units: heatmaps and overlap give notes, the rest of the page works."""
    from subroutine_circuits.adapters.transformer_lens import weight_names
    from subroutine_circuits.masks import WeightMask, save_mask

    res = make_experiment(tmp_path, inits=("trained",), n_base=2, n_mask=1)
    res["mask_kind"] = "weight"
    res.to_csv(tmp_path / "results.csv", index=False)
    model = make_tiny_transformer(seed=0, d_vocab=50)
    mask = WeightMask(model, None, weight_names(model))
    n = int(mask.flat_binary().numel())
    for i, rel in enumerate(res["mask_path"]):
        flat = torch.zeros(n, dtype=torch.bool)
        flat[i::7] = True
        save_mask(tmp_path / rel, WeightMask.fixed(model, flat, weight_names(model)), model)
    page = build_report(tmp_path, rhtml.ReportConfig()).read_text(encoding="utf-8")
    assert "section unavailable" not in page
    assert "weight masks: per-unit heatmaps need unit masks" in page
    assert "no pair of readable A/B masks" in page
    assert "mask kinds: weight" in page
    assert page.count("<svg") == 2 + 1  # accuracy bars per subroutine + scatter


def test_load_mask_units_reads_real_masks(tmp_path, tiny_model):
    """The stats adapter returns save_mask's binary mask and the unit map's (layer, kind, index)."""
    from subroutine_circuits.analysis.summary import load_mask_units
    from subroutine_circuits.masks import UnitMask, save_mask

    unit_map = tl_unit_map(tiny_model)
    flat = torch.zeros(unit_map.n_units, dtype=torch.bool)
    flat[[0, 3, 5, 70]] = True
    save_mask(tmp_path / "m.pt", UnitMask.fixed(unit_map, flat), tiny_model)
    got, units = load_mask_units(tmp_path / "m.pt")
    assert np.array_equal(got, flat.numpy())
    assert units == [tuple(u) for u in unit_map.units()]
    assert units[0] == (0, "head", 0) and len(units) == 2 * (4 + 64)
