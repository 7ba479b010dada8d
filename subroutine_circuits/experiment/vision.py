"""The vision path of the study: image tasks on hooked CNNs, through the same experiment.

``[model] family = "cnn"`` makes the study (``experiment.runner``) call this module for what is
family-specific; the mask search, the ablation matrix, the statistics, patching and the report
are the ones of the language path (:mod:`~subroutine_circuits.experiment.search`,
:mod:`~subroutine_circuits.experiment.evaluate`, ...), through the
:class:`~subroutine_circuits.adapters.cnn.CNNAdapter`.

- :func:`prepare_vision`: the shape-world task and its seeded splits (composite and ``sub_<p>``
  problems for training, every kind for validation and test; no scene in two splits), drawn in
  parallel chunks with streams fixed by (split, kind, chunk), so the data do not depend on the
  number of worker processes.
- :func:`build_cnn_base_model`: one base model per (init, seed): ``trained`` = the OOO
  recipe (:func:`~subroutine_circuits.models.cnn_train.train_cnn_ooo`) from a kaiming init;
  ``pretrained`` = SimCLR (:func:`~subroutine_circuits.models.simclr.simclr_pretrain`, its own
  run per base seed, on training-split images only; the projection head dropped) then the very
  same fine-tuning recipe and budget; ``random_init`` = the untrained kaiming init of that seed
  (the init the ``trained`` model of the seed started from). Compute is recorded in the meta.
- :func:`cnn_load_or_build`: load or build the CNN; the study's base-model stage encodes the
  splits and decides ``base_ok`` on the VALIDATION composite accuracy (a model stuck at 0.75,
  one subroutine learned, is
  excluded and listed, never hidden); the bypass check (every unit ablated) is recorded.
- :func:`image_pair_batch`: minimal image pairs for patching CNN channels.
- :func:`tune_cpu_allocator`: on the CPU, keep freed tensor memory in the heap (glibc).
- :func:`vision_demo_config`: ``subroutine-circuits demo --vision``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from subroutine_circuits.experiment.config import ExperimentConfig

#: Problems per generated chunk (one random stream each).
CHUNK = 250
#: Fewest problems of one split worth drawing in worker processes (they take ~1 s to start).
PARALLEL_MIN = 1000
#: Accuracy over chance (with every unit ablated) above which a model has a bypass.
BYPASS_TOLERANCE = 0.05
#: glibc ``mallopt`` settings of :func:`tune_cpu_allocator`: M_MMAP_THRESHOLD (-3) and
#: M_TRIM_THRESHOLD (-1), in bytes.
MALLOC_SETTINGS = {-3: 32 * 2**20, -1: 512 * 2**20}
_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process heap (glibc only; once per process).

    By default glibc serves blocks above a dynamic threshold with ``mmap`` and returns freed
    heap memory to the system, so the CNN's activations (a few MB each, allocated and freed in
    every pass on the CPU) are page-faulted in again on every pass: measured on the ``cpu``
    preset, 20-25% of a training step went to the kernel (``sys`` time). Raising the mmap
    threshold to 32 MB and the trim threshold to 512 MB removes that; the numbers computed are
    the same, the process keeps its peak heap. Returns whether the settings were applied
    (False elsewhere than glibc, e.g. macOS)."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = all(mallopt(k, v) == 1 for k, v in MALLOC_SETTINGS.items())
    return _ALLOCATOR_TUNED


# ----------------------------------------------------------------------------- data


def image_split_counts(task: Any, data: Any, rule: Mapping[str, bool] | None = None):
    """``{split: {kind: n}}``: training has the composite (``data.n_train_composite``, default
    ``n_train``) and every ``sub_<p>`` (``n_train``); validation and test every kind."""
    kinds = task.problem_kinds(rule)
    n_comp = data.n_train_composite or data.n_train
    train = {k: (n_comp if k == "composite" else data.n_train) for k in kinds
             if not k.startswith("partition_")}  # fmt: skip
    return {
        "train": train,
        "val": {k: data.n_val for k in kinds},
        "test": {k: data.n_test for k in kinds},
    }


def _draw_chunk(args: tuple) -> Any:
    """Worker entry: one chunk of problems (its own stream), excluding ``exclude`` scenes."""
    task, kind, n, seed, rule, exclude, parts = args
    return task.make_problems(kind, n, seed, None, rule, exclude=exclude, _stream_parts=parts)


def _concat(parts: list[Any]) -> Any:
    """One ``ImageProblems`` from chunks of one kind."""
    from subroutine_circuits.tasks.vision import ImageProblems

    first = parts[0]
    arrays = {
        name: np.concatenate([getattr(p, name) for p in parts])
        for name in ("images", "labels", "odd", "values", "counts", "context_n")
    }
    return ImageProblems(**arrays, predicates=first.predicates, kind=first.kind, task=first.task)


def make_image_splits(
    task: Any,
    counts: Mapping[str, Mapping[str, int]],
    seed: int,
    rule: Mapping[str, bool] | None = None,
    workers: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Seeded ``splits[split][kind]`` of ``ImageProblems`` with exactly ``counts`` problems.

    Every (split, kind) is drawn in chunks of :data:`CHUNK` problems, each from its own stream
    (``(split, chunk)``), in ``workers`` processes (default: the CPU count, at most the number
    of chunks; splits under :data:`PARALLEL_MIN` problems are drawn in this process); a split
    excludes every scene of the splits before it.
    """
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or min(8, os.cpu_count() or 1)
    seen: set[bytes] = set()
    out: dict[str, dict[str, Any]] = {}
    for split in ("train", "val", "test"):
        jobs, owners = [], []
        for kind, n in counts[split].items():
            if n < 1:
                raise ValueError(f"the {split} split needs >= 1 {kind!r} problem, got {n}")
            for i, start in enumerate(range(0, n, CHUNK)):
                size = min(CHUNK, n - start)
                jobs.append((task, kind, size, seed, rule, frozenset(seen), (split, i)))
                owners.append(kind)
        if workers > 1 and len(jobs) > 1 and sum(j[2] for j in jobs) >= PARALLEL_MIN:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                drawn = list(pool.map(_draw_chunk, jobs))
        else:
            drawn = [_draw_chunk(j) for j in jobs]
        out[split] = {
            kind: _concat([d for d, o in zip(drawn, owners) if o == kind]) for kind in counts[split]
        }
        from subroutine_circuits.tasks.vision import scene_keys

        for probs in out[split].values():
            seen.update(scene_keys(probs.labels))
    return out


def prepare_vision(cfg: ExperimentConfig) -> tuple[Any, dict[str, dict[str, Any]], list[str]]:
    """The image task of ``cfg``, its splits and the subroutines (``experiment.data.prepare``
    makes them a ``Prepared``, without a tokenizer)."""
    from subroutine_circuits.tasks.vision import vision_task

    task = vision_task(cfg.task, image_size=cfg.model.image_size, rule=cfg.rule)
    subroutines = list(cfg.subroutines or task.predicates)
    unknown = [s for s in subroutines if s not in task.predicates]
    if unknown:
        raise ValueError(
            f"unknown subroutine {unknown[0]!r}; the task's predicates are {list(task.predicates)}"
        )
    counts = image_split_counts(task, cfg.data, cfg.rule)
    splits = make_image_splits(task, counts, cfg.data.seed, cfg.rule)
    return task, splits, subroutines


def pretraining_images(prep: Any, n: int, seed: int):
    """``n`` normalised images ``[n, 3, h, w]`` drawn (seeded) from every problem of the
    TRAINING split (all kinds: every image type, labels unused)."""
    from subroutine_circuits.tasks.vision import images_to_tensor

    pool = np.concatenate([p.images.reshape(-1, *p.images.shape[2:])
                           for p in prep.splits["train"].values()])  # fmt: skip
    rng = np.random.default_rng([int(seed), 20_231])
    idx = rng.choice(len(pool), size=min(int(n), len(pool)), replace=False)
    return images_to_tensor(pool[np.sort(idx)])


# ----------------------------------------------------------------------------- base models


def cnn_model_config(cfg: ExperimentConfig, task: Any, seed: int, device: str):
    """The ``CNNConfig`` of ``cfg``'s preset, image size (default: the task's) and overrides."""
    from subroutine_circuits.models.cnn import cnn_config

    size = cfg.model.image_size or task.image_size
    return cnn_config(cfg.model.preset, image_size=int(size), seed=int(seed), device=device,
                      **dict(cfg.model.overrides))  # fmt: skip


def cnn_train_config(cfg: ExperimentConfig, seed: int, device: str):
    """``CNNTrainConfig`` from ``[train]`` (the same recipe for ``trained`` and ``pretrained``)."""
    from subroutine_circuits.models.cnn_train import CNNTrainConfig

    return CNNTrainConfig(**{"seed": seed, "device": device, "progress": False, **cfg.train})


def _pretrain(model: Any, cfg: ExperimentConfig, prep: Any, seed: int, device: str) -> dict:
    """SimCLR on training-split images (its own run for this seed); returns its record."""
    from subroutine_circuits.models.simclr import simclr_pretrain

    images = pretraining_images(prep, cfg.data.corpus_size, seed)
    scfg = cfg.simclr.build(seed=seed, device=device, progress=False)
    info = simclr_pretrain(model, images, scfg)
    keep = {k: v for k, v in info.items() if not isinstance(v, list)}
    keep["images_seen"] = int(info["steps"]) * int(info["batch_size"])
    return keep


def build_cnn_base_model(
    cfg: ExperimentConfig, prep: Any, init: str, seed: int, device: str
) -> tuple[Any, dict[str, Any]]:
    """Create (pretrain / train as ``init`` says) one CNN base model; returns ``(model, meta)``
    with ``meta["compute"]`` (steps, images seen, wall and CPU seconds of each phase)."""
    from subroutine_circuits.models.cnn import HookedCNN, count_params
    from subroutine_circuits.models.cnn_train import train_cnn_ooo

    mcfg = cnn_model_config(cfg, prep.task, seed, device)
    model = HookedCNN(mcfg)  # kaiming init seeded by ``seed`` (= reinit_cnn(model, seed))
    meta: dict[str, Any] = {"init": init, "seed": seed, "family": "cnn",
                            "preset": mcfg.preset, "image_size": mcfg.image_size,
                            "n_params": count_params(mcfg)}  # fmt: skip
    compute: dict[str, Any] = {}
    if init == "pretrained":
        cpu = time.process_time()
        meta["pretrain"] = _pretrain(model, cfg, prep, seed, device)
        compute.update(pretrain_steps=meta["pretrain"]["steps"],
                       pretrain_images=meta["pretrain"]["images_seen"],
                       pretrain_seconds=meta["pretrain"]["seconds"],
                       pretrain_cpu_seconds=time.process_time() - cpu)  # fmt: skip
    if init != "random_init":
        tcfg = cnn_train_config(cfg, seed, device)
        cpu = time.process_time()
        res = train_cnn_ooo(
            model, prep.splits["train"]["composite"], prep.splits["val"]["composite"], tcfg
        )
        compute["train_cpu_seconds"] = time.process_time() - cpu
        meta["best_val_acc"] = float(res.best_val_acc)
        meta["train"] = {"steps": res.steps, "best_step": res.best_step,
                         "stop_reason": res.stop_reason, "seconds": res.seconds}  # fmt: skip
        compute.update(train_steps=res.steps, train_problems=res.steps * tcfg.batch_size,
                       train_seconds=res.seconds)  # fmt: skip
    compute["total_seconds"] = compute.get("pretrain_seconds", 0.0) + compute.get(
        "train_seconds", 0.0
    )
    meta["compute"] = compute
    return model.eval(), meta


def cnn_load_or_build(job: Any, prep: Any, store: Any, device: str):
    """The CNN of a base-model job: loaded from the store, or built, (pre)trained as its init
    says and saved. Returns ``(model, meta, adapter, save)``; ``save(meta)`` stores the model
    with updated metadata (the study's base-model stage measures accuracies and the bypass
    check the same way for every family)."""
    from subroutine_circuits.adapters.cnn import CNNAdapter
    from subroutine_circuits.models.cnn import load_cnn, save_cnn

    if str(device).startswith("cpu"):
        tune_cpu_allocator()  # this process runs the CNN's passes on the CPU
    model_dir = store.model_dir(job.key)
    if store.has_model(job.key):
        model, meta = load_cnn(model_dir, device=device)
    else:
        model, meta = build_cnn_base_model(job.cfg, prep, job.init, job.seed, device)
    adapter = CNNAdapter(model).freeze()

    def save(meta: dict) -> None:
        save_cnn(model_dir, model, meta)

    return model, meta, adapter, save


# ----------------------------------------------------------------------------- patching


def image_pair_batch(
    adapter: Any,
    task: Any,
    subroutine: str,
    cfg: Any,
    oddness_metric: Any,
    seed: int | None = None,
    split: str = "test",
) -> tuple[Any, str | None]:
    """Minimal image pairs of ``subroutine`` as one patching batch (a ``PatchBatch``, readout
    ``"embed"``; ``experiment.patching`` wraps it in its ``PairData``), and why it holds fewer
    than ``cfg.n_pairs`` pairs (None: it holds them all). A pair the shape world cannot build
    in its tries ends the drawing; with no pair at all the batch is None.

    The clean image breaks ``subroutine`` only (it is the odd one among 3 rule-following context
    images of the same problem context); the corrupted one is the same scene with the predicate
    restored by moving one object (or adding / removing one for number). The metric is the
    oddness score ``-sum_j <e, c_j>`` of the (patched) embedding against the normalised,
    unpatched context embeddings (``oddness_metric(context_sum)`` makes it). Pairs come from the
    ``split`` stream of the shape world (an independent seeded stream per split).
    """
    import torch
    import torch.nn.functional as F

    from subroutine_circuits.patching.circuits import PatchBatch

    seed = cfg.seed if seed is None else seed
    pairs = task.make_minimal_pairs(
        subroutine, cfg.n_pairs, seed=seed, split=split, allow_fewer=True
    )
    why = None
    if len(pairs) < cfg.n_pairs:
        why = f"the shape world built no pair flipping {subroutine!r} after the first {len(pairs)}"
    if len(pairs) == 0:
        return None, why
    t = pairs.to_tensors()
    device = adapter.device
    with torch.no_grad():
        ctx = t["contexts"]
        emb = adapter.embed({"images": ctx.reshape(-1, *ctx.shape[2:]).to(device)})
    ctx_sum = F.normalize(emb.float(), dim=-1).view(len(pairs), -1, emb.shape[-1]).sum(1)
    batch = PatchBatch(t["clean"].to(device), t["corrupted"].to(device), oddness_metric(ctx_sum))
    return batch, why


# ----------------------------------------------------------------------------- the demo


def vision_demo_config() -> ExperimentConfig:
    """``demo --vision``: Number-Contact at 32 px (the task that learns fastest), the ``cpu``
    CNN preset, trained / SimCLR-pretrained / random-init base models (one seed each), channel
    and head-neuron masks (2 grid points x 2 mask seeds), channel patching; sized for at most
    5 minutes on 2 idle CPU cores.

    Demo-scale choices made on run time alone (measured on the 2-core machine, never on the
    results): a mask budget of 64 steps (was 80). 99 matched random subnetworks per run
    (issue 22: at least 99 wherever a verdict is reported, so that a run with up to four tying
    draws passes ``randabl_p <= 0.05``), drawn only for the runs they can decide
    (``random_controls = "candidates"``: runs that pass both margins). ``workers = 3``, one process
    per base-model job even on 2 cores: with 2 workers the random-init job waits for the
    trained one (critical path trained + random_init); 3 processes share the cores so the wall
    time is about half the jobs' summed time. ``workers`` changes no result.
    """
    cfg = ExperimentConfig(
        task="number_contact",
        inits=["trained", "pretrained", "random_init"],
        base_seeds=[0],
        mask_seeds=[0, 1],
        data={"n_train": 300, "n_train_composite": 2000, "n_val": 100, "n_test": 160,
              "corpus_size": 4000},
        model={"family": "cnn", "preset": "cpu", "image_size": 32},
        train={"lr": 2e-3, "batch_size": 32, "max_steps": 400, "eval_every": 25, "patience": 6,
               "target_val_acc": 0.97},
        simclr={"max_steps": 120, "batch_size": 64, "lr": 1e-3},
        # channel masks need a strong L0 weight: at 0.5-6 they keep 25-50% of the units and
        # ablating them breaks both partitions; at ~15 they keep ~11% (measured on this demo)
        # no minimality pass (mask.prune): the 5-minute CPU budget, as in the language demo
        mask={"steps": 64, "batch_size": 16, "prune": False,
              "grid": [{"l0_weight": 10.0}, {"l0_weight": 20.0}]},  # fmt: skip
        n_random=99,
        random_controls="candidates",
        patching_pairs=16,
        workers=3,
    )  # fmt: skip
    cfg.validate()
    return cfg
