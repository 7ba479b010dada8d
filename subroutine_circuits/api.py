"""The public API: the verbs a notebook needs, with keyword arguments.

```python
from subroutine_circuits import (
    get_task, make_splits, build_model, train_model, train_mask, evaluate_mask, patch, compare,
    run_experiment, load_config,
)
task = get_task("agreement_singular")
splits = make_splits(task, n_train=600, n_val=150, n_test=160)
model = build_model(task, preset="tiny", seed=0)           # a model adapter
train_model(model, splits)
mask = train_mask(model, splits, "subject_plural")
row = evaluate_mask(model, mask, splits, "subject_plural")  # the ablation matrix + verdict
rows = patch(model, task, "subject_plural", splits=splits, mask=mask)
```

Models are passed around as **model adapters** (``subroutine_circuits.adapters``): the adapter
knows its family (units, maskable weights, how stimuli are encoded and read out);
``adapter.model`` is the underlying ``HookedRootModule``. Every verb also accepts a bare
TransformerLens model (wrapped with :func:`~subroutine_circuits.adapters.as_adapter`).

Vocabulary: a *subroutine* is a part of the task (one predicate, e.g. ``subject_plural``); a
*subnetwork* is the set of units a mask keeps. "Ablating" a unit always means replacing its
activation by its ablation value (``zero``, ``mean`` over reference stimuli, ``resample``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from subroutine_circuits.objectives import PromptPairs

# ----------------------------------------------------------------------------- tasks


def get_task(name_or_file: str | os.PathLike, *, rule: Mapping[str, bool] | None = None):
    """A built-in task by name (see ``subroutine-circuits tasks``) or a user task from a
    ``.jsonl`` / ``.csv`` file of stimuli with predicate columns. ``rule`` overrides the
    predicate values the positives of odd-one-out problems share."""
    from subroutine_circuits.tasks import load_task

    return load_task(name_or_file, rule=rule)


def make_splits(
    task: Any,
    *,
    n_train: int = 600,
    n_val: int = 150,
    n_test: int = 160,
    seed: int = 0,
    rule: Mapping[str, bool] | None = None,
) -> dict[str, dict[str, list]]:
    """Odd-one-out problems ``splits[split][kind]`` for ``split`` in train/val/test and every
    kind (``composite``, ``sub_<p>``, ``partition_<p>``); no stimulus text is in two splits."""
    from subroutine_circuits.tasks import make_splits as _make_splits

    return _make_splits(task, n_train, seed=seed, rule=rule, split_sizes=(n_train, n_val, n_test))


# ----------------------------------------------------------------------------- models


def _adapter(model: Any):
    from subroutine_circuits.adapters import as_adapter

    return as_adapter(model)


def build_model(
    task: Any = None,
    *,
    preset: str = "tiny",
    attention: str = "causal",
    pool: str = "last",
    n_ctx: int = 32,
    seed: int = 0,
    device: str = "cpu",
    tokenizer: Any = None,
    **overrides: Any,
):
    """A fresh TransformerLens model of a preset (``tiny`` / ``small`` / ``base``) sized for
    ``task``'s vocabulary, wrapped in its adapter (with the task's tokenizer).

    ``overrides`` change ``HookedTransformerConfig`` fields (e.g. ``n_layers=3``).
    """
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.models import ModelSpec, make_model
    from subroutine_circuits.utils import resolve_device

    if tokenizer is None:
        if task is None:
            raise ValueError("build_model needs a task or a tokenizer (for the vocabulary)")
        tokenizer = task.tokenizer()
    spec = ModelSpec(
        preset=preset, attention=attention, n_ctx=n_ctx, pool=pool, overrides=overrides
    )
    model = make_model(spec, tokenizer.vocab_size, seed=seed, device=resolve_device(device))
    return as_adapter(model, tokenizer=tokenizer, pool=pool)


def load_model(path: str | os.PathLike, *, device: str = "auto", pool: str | None = None):
    """A saved model as an adapter: a checkpoint written by this library (``save_model``) or a
    local Hugging Face folder (config, weights and tokenizer files; nothing is downloaded).

    Hugging Face folders load with their own tokenizer (``HFTaskTokenizer``: stimuli end in a
    constant readout token) into the adapter of the installed TransformerLens: on 3.9 GPT-2 ->
    ``HookedTransformer``, BERT -> ``HookedEncoder``; on 4.x a ``TransformerBridge`` for any
    architecture it supports (GPT-2, BERT, Pythia, Llama, ...)."""
    from pathlib import Path

    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.utils import resolve_device

    device = resolve_device(device)
    if (Path(path) / "meta.json").exists():
        from subroutine_circuits.models import load_checkpoint

        model, tokenizer, _ = load_checkpoint(path, device=device)
    else:
        from subroutine_circuits.experiment.hf import load_hf_model

        model, tokenizer = load_hf_model(path, device=device)
    return as_adapter(model, tokenizer=tokenizer, pool=pool)


def save_model(path: str | os.PathLike, model: Any, *, meta: dict | None = None):
    """Save a model (and its adapter's tokenizer) as a checkpoint folder; returns the path."""
    from subroutine_circuits.models import save_checkpoint

    adapter = _adapter(model)
    return save_checkpoint(path, adapter.model, getattr(adapter, "tokenizer", None), meta or {})


def train_model(model: Any, splits: Mapping[str, Mapping[str, list]], **options: Any):
    """Train the model on the composite odd-one-out task (early stopping on validation
    accuracy; the best weights are kept). ``options`` are ``TrainConfig`` fields, e.g.
    ``max_steps=600``, ``lr=3e-3``, ``progress=False``. Returns the ``TrainResult``."""
    from subroutine_circuits.models import TrainConfig, train_ooo

    adapter = _adapter(model)
    options.setdefault("pool", getattr(adapter, "pool", None))
    options.setdefault("device", str(adapter.device))
    cfg = TrainConfig(**options)
    return train_ooo(
        adapter.model,
        splits["train"]["composite"],
        splits["val"]["composite"],
        adapter.tokenizer,
        cfg,
    )


def accuracy(model: Any, problems: Sequence[Any], *, mask: Any = None) -> float:
    """Odd-one-out accuracy of the model on problems (with ``mask`` applied if given)."""
    adapter = _adapter(model)
    return adapter.accuracy(adapter.encode_problems(problems), mask)


# ----------------------------------------------------------------------------- masks


def train_mask(
    model: Any,
    splits: Mapping[str, Mapping[str, list]],
    subroutine: str,
    *,
    kind: str = "unit",
    parametrization: str = "hard_concrete",
    unit_kinds: Sequence[str] = ("head", "neuron"),
    layers: Sequence[int] | None = None,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 0.15,
    init: float = 2.0,
    l0_weight: float = 1.0,
    seed: int = 0,
):
    """Train a mask over the frozen model that keeps a subnetwork solving ``subroutine``'s own
    odd-one-out problems (``splits["train"]["sub_<subroutine>"]``), with an L0 penalty.

    ``kind="unit"`` masks heads / neurons (``unit_kinds``), ``kind="weight"`` individual weights.
    Returns the mask in eval mode (``mask.flat_binary()``: the kept units)."""
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.search import encode
    from subroutine_circuits.experiment.search import train_mask as _train

    adapter = _adapter(model).freeze()
    key = f"sub_{subroutine}"
    if key not in splits.get("train", {}):
        raise ValueError(f"the train split has no {key!r} problems (unknown subroutine?)")
    cfg = MaskSearchConfig(
        kind=kind,
        parametrization=parametrization,
        unit_kinds=tuple(unit_kinds),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        init=init,
        l0_weight=l0_weight,
        layers=None if layers is None else list(layers),
        grid=[],
    )
    return _train(adapter, encode(adapter, splits["train"][key]), cfg, {}, seed)


def evaluate_mask(
    model: Any,
    mask: Any,
    splits: Mapping[str, Mapping[str, list]],
    subroutine: str,
    *,
    other: str | None = None,
    ablation: str = "mean",
    seed: int = 0,
    chance: float = 0.25,
    margin: float = 0.05,
) -> dict[str, Any]:
    """The ablation matrix of a subroutine mask on the TEST split, with the verdict.

    Rows of the matrix: the subnetwork alone (``sub_*``), the subnetwork ablated (``abl_*``,
    by ``ablation``; ``ablzero_*`` / ``ablmean_*`` / ``ablresample_*`` all reported) and 99
    random subnetworks with as many units per layer and kind ablated (``randabl_*``,
    ``randabl_p``); columns: the target partition (only ``subroutine`` breaks the rule), the
    ``other`` subroutine's partition. ``sub_diff`` / ``abl_diff`` are chance-clipped
    differences; ``compositional`` is ``sub_diff > margin``, ``abl_diff < -margin`` and
    ``randabl_p <= 0.05`` (ties with the random draws decided exactly); ``margins_ok`` the two
    margins alone and ``paper_compositional`` the paper's criterion (margins, no random
    control). Mean ablation (position-aware) uses the training composite problems as reference
    (``experiment.evaluate.ablation_matrix``).
    """
    from subroutine_circuits.experiment.evaluate import ablation_matrix
    from subroutine_circuits.experiment.search import encode

    adapter = _adapter(model).freeze()
    if other is None:
        preds = sorted(k[len("partition_") :] for k in splits["test"] if k.startswith("partition_"))
        rest = [p for p in preds if p != subroutine]
        if not rest:
            raise ValueError(f"no other subroutine than {subroutine!r} in the splits")
        other = rest[0]
    test = {k: encode(adapter, v) for k, v in splits["test"].items()}
    ref_kind = "composite" if splits["train"].get("composite") else f"sub_{subroutine}"
    reference = encode(adapter, splits["train"][ref_kind])
    return ablation_matrix(
        adapter,
        mask,
        test,
        subroutine,
        other,
        seed=seed,
        reference=reference,
        chance=chance,
        margin=margin,
        ablation=ablation,
    )


# ----------------------------------------------------------------------------- patching


def patch(
    model: Any,
    task: Any,
    subroutine: str,
    *,
    splits: Mapping[str, Mapping[str, list]] | None = None,
    mask: Any = None,
    methods: Sequence[str] = ("activation", "attribution"),
    n_pairs: int = 24,
    seed: int = 0,
    **options: Any,
) -> list[dict[str, Any]]:
    """Activation / attribution patching of ``subroutine`` on minimal pairs of ``task``:
    per-unit scores, circuits (top-k, smallest faithful), faithfulness (CPR / CMD) and, with a
    unit ``mask``, its comparison with the mask (Jaccard at matched size, Spearman, ROC AUC)
    and the cross-ablation of the patching circuit on the test partitions of ``splits``.
    ``options`` are further ``PatchingConfig`` fields. Returns one row per method."""
    from subroutine_circuits.experiment.patching import PatchingConfig, run_patching

    adapter = _adapter(model)
    cfg = PatchingConfig(methods=tuple(methods), n_pairs=n_pairs, seed=seed, **options)
    test = None if splits is None else splits["test"]
    return run_patching(adapter, adapter.tokenizer, task, subroutine, test, mask, cfg)


def compare(scores: Any, mask: Any, *, use_abs: bool = True) -> dict[str, float]:
    """Compare per-unit patching scores with a unit mask: Jaccard of the top-k circuit at the
    mask's size, ROC AUC of the scores against the kept set, Spearman with the mask's
    per-unit parameters."""
    from subroutine_circuits.experiment.patching import mask_unit_params
    from subroutine_circuits.patching.compare import compare_with_mask

    keep = mask.flat_binary().bool().cpu()
    return compare_with_mask(scores, keep, mask_unit_params(mask), use_abs)


# ----------------------------------------------------------------------------- the study


def load_config(path: str | os.PathLike):
    """An ``ExperimentConfig`` from a TOML file (unknown keys are refused by name)."""
    from subroutine_circuits.experiment.config import load_config as _load

    return _load(path)


def demo_config():
    """The built-in demo experiment's configuration (tiny models, 3 inits, 3 x 3 seeds)."""
    from subroutine_circuits.experiment.config import demo_config as _demo

    return _demo()


def run_experiment(config: Any, out_dir: str | os.PathLike, *, progress: bool = True):
    """Run (or resume) a whole study into ``out_dir`` (``config``: an ``ExperimentConfig`` or
    a TOML path); returns the results DataFrame (columns: docs/RESULTS.md)."""
    from subroutine_circuits.experiment.runner import run_experiment as _run

    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    return _run(config, out_dir, progress=progress)


def build_report(out_dir: str | os.PathLike):
    """(Re)write ``report.html`` of an experiment folder; returns its path."""
    from subroutine_circuits.report import build_report as _build

    return _build(out_dir)


# ----------------------------------------------------------------------------- your prompts


def pretrain_model(
    model: Any,
    task: Any,
    *,
    n_sentences: int = 4000,
    steps: int = 400,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Self-supervised pretraining in place on ``n_sentences`` of ``task``'s corpus (next-token
    prediction for causal models, masked tokens for bidirectional ones), so that the model's
    vocabulary logits mean something (e.g. for a logit difference). Returns the losses."""
    import random

    from subroutine_circuits.models.pretraining import PretrainConfig, pretrain

    adapter = _adapter(model)
    corpus = task.corpus(n_sentences, random.Random(seed))
    cfg = PretrainConfig(steps=steps, seed=seed, device=str(adapter.device), progress=progress)
    return pretrain(adapter.model, corpus, adapter.tokenizer, cfg)


def prompt_pairs(
    model: Any, pairs: Sequence[tuple[Any, Any, Any, Any]], *, tokenizer: Any = None
) -> PromptPairs:
    """Prompt pairs for the model: ``(clean, corrupted, answer, wrong)`` as texts (tokenized
    with ``tokenizer``, the adapter's word tokenizer or ``model.to_tokens``) or token ids; each
    answer one token, a pair's prompts of one length (``objectives.make_prompt_pairs``)."""
    from subroutine_circuits.objectives import make_prompt_pairs

    return make_prompt_pairs(model, pairs, tokenizer=tokenizer)


# ``find_circuit``, ``ablate_circuit`` and ``compare_circuits`` (typed, in
# :mod:`subroutine_circuits.pairs`) are exported from the package as they are.


# ----------------------------------------------------------------------------- circuit files


def export_circuit(
    mask_or_keep: Any,
    path: str | os.PathLike,
    *,
    unit_map: Any = None,
    scores: Any = None,
    model: Any = None,
    neuron_detail: bool = True,
):
    """Write a circuit as MIB / EAP-IG circuit JSON (docs/CIRCUIT_FORMAT.md); returns the path.

    ``mask_or_keep``: a ``UnitMask`` (its binary mask and unit map) or a boolean keep vector over
    ``unit_map``'s units. ``scores``: optional per-unit scores (node scores in the file).
    ``model`` (adapter or TransformerLens model): fills the file's ``cfg`` (n_layers, n_heads,
    d_model, parallel_attn_mlp) so that EAP-IG's ``Graph.from_json`` can read it."""
    from subroutine_circuits.patching.mib_format import save_circuit

    if hasattr(mask_or_keep, "flat_binary"):
        unit_map = mask_or_keep.unit_map if unit_map is None else unit_map
        keep = mask_or_keep.flat_binary().bool().cpu()
    else:
        keep = mask_or_keep
    if unit_map is None and model is not None:
        unit_map = _adapter(model).unit_map()
    if unit_map is None:
        raise ValueError("export_circuit: pass unit_map= (or a UnitMask, or model=) with a tensor")
    shape: dict[str, Any] = {}
    cfg = None if model is None else getattr(_adapter(model).model, "cfg", None)
    if cfg is not None:
        shape = {
            "n_layers": int(cfg.n_layers),
            "n_heads": int(cfg.n_heads),
            "d_model": int(cfg.d_model),
            "parallel_attn_mlp": bool(getattr(cfg, "parallel_attn_mlp", False)),
        }
    return save_circuit(path, unit_map, keep, scores, neuron_detail=neuron_detail, **shape)


def import_circuit(path: str | os.PathLike, unit_map: Any = None):
    """The boolean keep vector of a MIB / EAP-IG circuit JSON file over ``unit_map`` (default:
    the unit map stored in files written by :func:`export_circuit`); use it as
    ``UnitMask.fixed(unit_map, keep, "zero")``."""
    from subroutine_circuits.patching.mib_format import load_circuit

    return load_circuit(path, unit_map)
