"""The package's import graph: no cycles (function-level imports count), layers respected."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "subroutine_circuits"
NAME = "subroutine_circuits"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by a (possibly relative) ``from ... import``."""
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Edges ``module -> imported package module`` from every import statement, at any depth.

    ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of
    ``a.b``. Lazy-export tables (strings) are not imports.
    """
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in mods else base)
            for t in targets:
                if t.startswith(NAME) and t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_sees_function_level_imports():
    """Sanity check of the parser on a known function-level import."""
    g = import_graph()
    assert "subroutine_circuits.experiment.runner" in g["subroutine_circuits.experiment"]
    assert "subroutine_circuits.adapters.transformer_lens" in g["subroutine_circuits.adapters"]


def test_find_cycle_detects_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for m in graph[n]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_layers_are_respected():
    """report/ and analysis/ never reach experiment/; masks/ knows no adapter, model or study;
    patching/ knows no study."""
    g = import_graph()

    def deps(prefix: str) -> set[str]:
        out: set[str] = set()
        for m in g:
            if m == prefix or m.startswith(prefix + "."):
                out |= {d for d in g[m]}
        return out

    def bad(prefix: str, forbidden: tuple[str, ...]) -> set[str]:
        return {d for d in deps(prefix) if d.startswith(forbidden)}

    exp = (f"{NAME}.experiment",)
    assert not bad(f"{NAME}.report", exp)
    assert not bad(f"{NAME}.analysis", exp)
    assert not bad(f"{NAME}.store", exp)
    assert not bad(f"{NAME}.masks", (f"{NAME}.adapters", f"{NAME}.models", *exp))
    assert not bad(f"{NAME}.patching", (f"{NAME}.tasks", *exp))
    assert not bad(f"{NAME}.adapters", (f"{NAME}.patching", *exp))
    # transitively too: nothing report imports leads to the study
    for m in [m for m in g if m.startswith(f"{NAME}.report")]:
        assert not {d for d in _reachable(g, m) if d.startswith(exp)}, m


#: names that belong to one model family (TransformerLens 3.9 / 4 classes and their internals)
FAMILY_NAMES = {
    "is_bridge", "is_encoder", "HookedEncoder", "HookedTransformer", "TransformerBridge",
    "ln_final", "encoder_output", "mlm_head", "stop_at_layer", "tl_compat",
}  # fmt: skip


def family_references(path: Path) -> list[tuple[int, str]]:
    """Where ``path`` names a model-family detail: a name, an attribute, an imported module or
    name, or a string constant (as in ``hasattr(model, "mlm_head")``); docstrings aside."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    hits = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom):
            names = (node.module or "").split(".") + [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [p for a in node.names for p in a.name.split(".")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [] if id(node) in docstrings else [node.value]
        hits += [(node.lineno, n) for n in names if n in FAMILY_NAMES]
    return hits


def test_experiment_knows_no_model_family():
    """The study (experiment/) talks to models through adapters only: no family names there
    (issue 24); adapters/ and models/ hold them."""
    root = Path(__file__).resolve().parents[1] / NAME / "experiment"
    found = {str(p.name): family_references(p) for p in sorted(root.glob("*.py"))}
    assert not {k: v for k, v in found.items() if v}


def test_family_check_sees_a_planted_reference(tmp_path):
    planted = tmp_path / "x.py"
    planted.write_text(
        '"""Docstring naming ln_final is fine."""\n'
        "from subroutine_circuits.models.tl_compat import is_bridge\n"
        "def f(model):\n"
        '    return hasattr(model, "mlm_head") or model.ln_final\n'
    )
    names = {n for _, n in family_references(planted)}
    assert names == {"tl_compat", "is_bridge", "mlm_head", "ln_final"}


def one_minus_products(path: Path) -> list[int]:
    """Lines of ``path`` with a product by ``(1 - x)``: the shape of ``keep * x + (1 - keep) *
    value``, the ablation formula."""

    def one_minus(n: ast.AST) -> bool:
        return (
            isinstance(n, ast.BinOp)
            and isinstance(n.op, ast.Sub)
            and isinstance(n.left, ast.Constant)
            and n.left.value == 1
        )

    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Mult)
        and (one_minus(node.left) or one_minus(node.right))
    ]


def test_one_ablation_mix():
    """The ablation formula is written once, ``masks.ablation.mix`` (issue 24): the batched
    masks (``mix_slices``), patching copies (``mix_copies``) and the planted-model checks call
    it; no other engine module mixes by hand."""
    root = Path(__file__).resolve().parents[1] / NAME
    engine = ["masks", "experiment", "patching", "groundtruth", "adapters"]
    files = [p for d in engine for p in sorted((root / d).rglob("*.py"))]
    files += [root / "objectives.py", root / "pairs.py"]
    found = {str(p.relative_to(root)): one_minus_products(p) for p in files}
    assert {k: len(v) for k, v in found.items() if v} == {"masks/ablation.py": 1}


def _calls_by_function(
    path: Path, attr: str, receiver: str | None = None, bare: bool = False
) -> list[tuple[str, str | None]]:
    """``(function, class)`` of every call ``<x>.<attr>(...)`` in ``path`` (the innermost
    enclosing function and its class; ``None`` outside a class), only where ``<x>``'s source
    ends with ``receiver`` when given; with ``bare``, calls ``<attr>(...)`` too."""
    out: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, func: str, cls: ast.ClassDef | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, func, child)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{cls.name}.{child.name}" if cls is not None else child.name
                visit(child, name, cls)
            else:
                named = (
                    bare
                    and isinstance(child, ast.Call)
                    and isinstance(child.func, ast.Name)
                    and child.func.id == attr
                )
                if named or (
                    isinstance(child, ast.Call)
                    and isinstance(child.func, ast.Attribute)
                    and child.func.attr == attr
                    and (receiver is None or ast.unparse(child.func.value).endswith(receiver))
                ):
                    out.append((func, cls.name if cls is not None else None))
                visit(child, func, cls)

    visit(ast.parse(path.read_text()), "<module>", None)
    return out


def _optimiser_classes(path: Path) -> list[str | None]:
    """The enclosing class (None outside one) of every use of ``torch.optim.<Optimiser>``."""
    out: list[str | None] = []

    def visit(node: ast.AST, cls: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child.name)
                continue
            if (
                isinstance(child, ast.Attribute)
                and ast.unparse(child.value).endswith("optim")
                and child.attr[:1].isupper()
                and not child.attr.startswith("Optimizer")
            ):
                out.append(cls)
            visit(child, cls)

    visit(ast.parse(path.read_text()), None)
    return out


def _mask_trainers(files: list[Path], root_class: str = "MaskTrainer") -> set[str]:
    """Names of the classes deriving (directly or through one another) from ``root_class``
    (and itself)."""
    bases: dict[str, set[str]] = {}
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in
                         node.bases}  # fmt: skip
                bases.setdefault(node.name, set()).update(names)
    found = {root_class}
    while True:
        more = {c for c, b in bases.items() if b & found} - found
        if not more:
            return found
        found |= more


def test_one_mask_training_loop():
    """Masks are trained by one loop (issue 24): ``experiment.converge.MaskTrainer.run`` is the
    only code that steps through a mask-training schedule (``evaluates_after``), its
    ``_evaluate_and_prune`` the only one that keeps best checkpoints (``plateau.update``), and
    every optimiser step of the mask engines (``masks``, ``experiment``, ``patching``,
    objectives, prompt pairs) is a method of a MaskTrainer: the K-batched unit masks of the
    study and the single mask of any kind under any objective are its two subclasses. (Base
    models' own training loops, ``models/`` and the planted models' ``groundtruth/``, train
    weights, not masks.)"""
    root = PKG
    every = sorted(root.rglob("*.py"))

    def calls(attr: str, receiver: str | None = None) -> set[tuple[str, str]]:
        return {
            (str(p.relative_to(root)), f)
            for p in every
            for f, _ in _calls_by_function(p, attr, receiver)
        }

    assert calls("evaluates_after") == {("experiment/converge.py", "MaskTrainer.run")}
    assert calls("update", "plateau") == {
        ("experiment/converge.py", "MaskTrainer._evaluate_and_prune")
    }
    engine = [
        p for d in ("masks", "experiment", "patching") for p in sorted((root / d).rglob("*.py"))
    ]
    engine += [root / "objectives.py", root / "pairs.py"]
    trainers = _mask_trainers(every)
    steps = [
        (str(p.relative_to(root)), f, c) for p in engine for f, c in _calls_by_function(p, "step")
    ]
    assert steps, "no optimiser step found: the check would pass vacuously"
    assert [s for s in steps if s[2] not in trainers] == []
    assert trainers >= {"MaskTrainer", "_BatchedUnitTrainer", "_SingleMaskTrainer"}


def test_one_base_model_training_loop():
    """Base models' weights are trained by one loop (issue 24): ``models.loop.optimizer_step``
    is the only optimiser step outside the mask engines, ``BaseTrainer.run`` the only code that
    calls it, and every optimiser of a base model is built by a BaseTrainer subclass:
    supervised (OOO, label, Hugging Face fine-tuning), pretraining, CNN, SimCLR and the
    entangled planted models' fine-tuning are subclasses that say what a batch and its loss
    are."""
    root = PKG
    every = sorted(root.rglob("*.py"))
    engine_dirs = ("masks", "experiment", "patching")
    base = [p for p in every if p.relative_to(root).parts[0] not in engine_dirs
            and p.name not in ("objectives.py", "pairs.py")]  # fmt: skip

    def calls(files: list[Path], attr: str) -> set[tuple[str, str]]:
        return {
            (str(p.relative_to(root)), f)
            for p in files
            for f, _ in _calls_by_function(p, attr, bare=True)
        }

    assert calls(base, "step") == {("models/loop.py", "optimizer_step")}
    assert calls(every, "optimizer_step") == {("models/loop.py", "BaseTrainer.run")}
    trainers = _mask_trainers(every, "BaseTrainer")
    built = [(str(p.relative_to(root)), c) for p in base for c in _optimiser_classes(p)]
    assert len(built) >= 5, "no optimiser construction found: the check would pass vacuously"
    assert [b for b in built if b[1] not in trainers] == []
    assert trainers >= {"BaseTrainer", "EvaluatedTrainer", "_SupervisedTrainer", "_Pretrainer",
                        "_CNNTrainer", "_SimCLRTrainer", "_PenaltyTrainer"}  # fmt: skip


def test_one_loop_check_sees_a_planted_loop(tmp_path):
    """The loop check finds a hand-written mask loop outside a MaskTrainer."""
    planted = tmp_path / "loop.py"
    planted.write_text(
        "def train(opt, schedule):\n"
        "    for step in range(10):\n"
        "        opt.step()\n"
        "        if schedule.evaluates_after(step):\n"
        "            pass\n"
    )
    assert _calls_by_function(planted, "step") == [("train", None)]
    assert _calls_by_function(planted, "evaluates_after") == [("train", None)]
    assert _calls_by_function(planted, "step", "sched") == []
    bare = tmp_path / "bare.py"
    bare.write_text("def fit(loss, opt):\n    optimizer_step(loss, opt)\n")
    assert _calls_by_function(bare, "optimizer_step") == []
    assert _calls_by_function(bare, "optimizer_step", bare=True) == [("fit", None)]
