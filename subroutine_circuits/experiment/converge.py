"""Masks trained to convergence, many at once: an epoch budget, a validation-plateau stop and
the experiment's one ablation.

The schedule (:class:`Schedule`) is the same for every parametrisation: a budget of optimiser
steps (set from epochs over the training problems by the caller), an evaluation of the binary
mask's validation accuracy every ``eval_every`` steps, and a stop once ``patience`` evaluations
pass without improvement (:class:`Plateau`). Continuous sparsification's temperature follows
``T(s) = temp_max ** (s / steps)`` after optimiser step ``s``, so it reaches ``temp_max`` at the
last step of the budget whatever the budget is.

*Improvement* is the rule the grid search chooses by: a higher validation accuracy, or an
accuracy within ``tolerance`` of the best seen with fewer kept units. A mask that starts with
every unit kept reaches the full model's accuracy at once; counting only accuracy would stop it
before the sparsity penalty has removed anything. The returned mask is the best checkpoint.

:class:`MaskTrainer` is the one mask-training loop of the package (schedule, evaluations,
plateau, best checkpoints); :func:`train_masks_converged` trains K unit masks (grid points x
mask seeds x subroutines) in it with one
:class:`~subroutine_circuits.experiment.batched.BatchedUnitMask`. A mask that has stopped is
dropped from the batch at the next evaluation (its rows leave the logits, optimiser state and
data order), so finished masks cost nothing; the others continue exactly as if trained alone.
Host synchronisations happen only at evaluations.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from subroutine_circuits.adapters import padded
from subroutine_circuits.experiment.schedule import (  # noqa: F401
    DensityMultiplier,
    Plateau,
    Schedule,
    budget_steps,
    mask_schedule,
    target_density,
)
from subroutine_circuits.masks.ablator import Ablator
from subroutine_circuits.masks.parametrization import MaskConfig
from subroutine_circuits.masks.unit_mask import UnitMask
from subroutine_circuits.masks.units import UnitMap
from subroutine_circuits.memory import OutOfMemoryError, rows_per_pass, run_chunked

#: Images per forward pass when training masks on image inputs on the CPU (larger batches of
#: small images spill the caches: a pass of 512 images runs about twice as slow per image as
#: passes of 64 to 128 for the CPU CNN preset, forward and backward).
CPU_IMAGE_ROWS = 128


@dataclass
class MaskRun:
    """One trained mask and how its training went.

    ``val_acc`` / ``density`` are those of the returned (best) checkpoint, ``steps`` the
    optimiser steps taken, ``best_step`` the step of the best checkpoint, ``final_temp`` the
    continuous-sparsification temperature after the last step taken (None for hard concrete),
    ``stopped_early`` whether the plateau stop ended training before the budget.
    """

    mask: Any
    val_acc: float
    density: float
    steps: int
    best_step: int
    final_temp: float | None
    stopped_early: bool
    history: list[tuple[int, float, float]] = field(default_factory=list)
    #: the minimality pass (``search.prune_run``): accuracy and units before, units dropped,
    #: rounds, whether the 1-minimal finish ran and what it removed
    pruned: dict[str, Any] | None = None

    #: the fields of :meth:`info`, in its order (``history`` follows, as lists)
    RECORD: ClassVar[tuple[str, ...]] = (
        "pruned", "val_acc", "density", "steps", "best_step", "final_temp", "stopped_early",
    )  # fmt: skip

    def info(self) -> dict[str, Any]:
        """The run's training record (JSON-ready)."""
        out = {name: getattr(self, name) for name in self.RECORD}
        out["history"] = [list(h) for h in self.history]
        return out


# ---------------------------------------------------------------------------- batched training
class _Batch:
    """Per-mask state of the batched loop that follows its rows (data, rng, plateau, best)."""

    def __init__(self, i: int, data_idx: int, n: int, off: int, seed: int, plateau: Plateau):
        self.i, self.data_idx, self.n, self.off = i, data_idx, n, off
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.plateau = plateau
        self.best: Any = None  # the best checkpoint so far (the trainer's snapshot)
        self.steps = 0
        self.temp: float | None = None

    def draw(self, bsz: int) -> list[int]:
        """The next minibatch, consumed from the mask's rng exactly like ``train_mask``."""
        if len(self.order) < bsz:
            perm = list(range(self.n))
            self.rng.shuffle(perm)
            self.order.extend(perm)
        out = [self.off + j for j in self.order[:bsz]]
        del self.order[:bsz]
        return out


def _select_rows(bm: Any, opt: Any, rows: list[int]) -> None:
    """Keep only ``rows`` of a BatchedUnitMask and its StackedAdam (in place)."""
    idx = torch.tensor(rows, device=bm.logits.device)
    bm.logits = nn.Parameter(bm.logits.detach()[idx].clone())
    bm.temperature = bm.temperature[idx].clone()
    bm.temp_growth = bm.temp_growth[idx].clone()
    bm.cfgs = [bm.cfgs[r] for r in rows]
    bm.generators = [bm.generators[r] for r in rows]
    if bm._device_generators is not None:
        bm._device_generators = [bm._device_generators[r] for r in rows]
    bm.ablation_values = [bm.ablation_values[r] for r in rows]
    bm.k = len(rows)
    opt.param = bm.logits
    opt.exp_avg = opt.exp_avg[idx].clone()
    opt.exp_avg_sq = opt.exp_avg_sq[idx].clone()
    opt.lrs = opt.lrs[idx.cpu()]
    opt._lrs_dev = opt._lrs_dev[idx]
    opt._shape[0] = len(rows)


def _evaluate(
    model: nn.Module,
    keep: Bool[Tensor, "k n"],
    val_sets: Sequence[Any],
    which: list[int],
    unit_map: UnitMap,
    ablator: Ablator,
    pool: str,
    autocast_dtype: torch.dtype | None,
    adapter: Any = None,
) -> list[float]:
    """Validation accuracy of each binary mask row on its own validation set (``adapter``
    scores inputs without tokens, see ``masks.batched.fixed_mask_scores``)."""
    from subroutine_circuits.experiment.batched import evaluate_fixed_masks

    acc = [0.0] * len(which)
    for d in sorted(set(which)):
        rows = [r for r, w in enumerate(which) if w == d]
        got = evaluate_fixed_masks(
            model,
            val_sets[d],
            keep[rows],
            pool,
            unit_map=unit_map,
            ablator=ablator,
            autocast_dtype=autocast_dtype,
            adapter=adapter,
        )
        for r, a in zip(rows, got.tolist()):
            acc[r] = float(a)
    return acc


class MaskTrainer:
    """The one mask-training loop: K masks step together under one :class:`Schedule`; after
    every ``eval_every`` steps (and the last) each mask's binary form is scored on its
    validation data, its :class:`Plateau` keeps the best checkpoint, and masks that have
    stopped leave the batch. Without validation data there is no evaluation and no early stop.

    Subclasses say how masks are held and stepped: :meth:`step` (one optimiser step of the
    alive masks), :meth:`validate` (score and density of each alive mask), :meth:`snapshot`
    (a checkpoint of alive row ``r``), :meth:`keep_rows` (drop the other rows), :meth:`training`
    (a context around runs of steps, e.g. the masks' hooks) and :meth:`results`. The K-batched
    unit masks of the study (:func:`train_masks_converged`) and a single mask of any kind under
    any objective (:func:`~subroutine_circuits.experiment.search.train_mask_run`) are two such
    subclasses of this loop.
    """

    def __init__(self, schedule: Schedule, batches: list[_Batch], validates: bool) -> None:
        self.schedule = schedule
        self.alive = batches
        self.done: list[_Batch] = []
        self.validates = validates

    def training(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a run of optimiser steps (none by default)."""
        return contextlib.nullcontext()

    def step(self, step: int) -> None:
        """One optimiser step (1-based ``step``) of every alive mask."""
        raise NotImplementedError

    def validate(self, step: int) -> tuple[list[float], list[float]]:
        """Validation score and density of each alive mask's binary form."""
        raise NotImplementedError

    def snapshot(self, row: int) -> Any:
        """A checkpoint of alive mask ``row`` (kept as its best)."""
        raise NotImplementedError

    def keep_rows(self, rows: list[int]) -> None:
        """Only alive masks ``rows`` train on (the others have stopped)."""

    def results(self) -> list[MaskRun]:
        """One :class:`MaskRun` per mask, in input order."""
        raise NotImplementedError

    def run(self, progress: bool = False, desc: str = "masks") -> list[MaskRun]:
        """Train until every mask has stopped or the budget is spent."""
        from tqdm.auto import tqdm

        sched = self.schedule
        bar = tqdm(total=sched.steps, disable=not progress, desc=desc, leave=False)
        step = 0
        while self.alive and step < sched.steps:
            with self.training():
                while True:
                    step += 1
                    self.step(step)
                    for b in self.alive:
                        b.steps = step
                    if sched.evaluates_after(step):
                        break
            bar.update(step - bar.n)
            if self.validates:
                self._evaluate_and_prune(step)
        bar.close()
        return self.results()

    def _evaluate_and_prune(self, step: int) -> None:
        """Validation of every alive mask, plateau bookkeeping, finished ones dropped."""
        scores, density = self.validate(step)
        for r, b in enumerate(self.alive):
            if b.plateau.update(scores[r], density[r], step):
                b.best = self.snapshot(r)
        stay = [r for r, b in enumerate(self.alive) if not b.plateau.stopped]
        if len(stay) < len(self.alive):
            self.done += [b for r, b in enumerate(self.alive) if r not in stay]
            self.alive = [self.alive[r] for r in stay]
            if stay:
                self.keep_rows(stay)


def train_masks_converged(
    model: nn.Module,
    train: Any | Sequence[Any],
    val: Any | Sequence[Any],
    cfg: Any,
    hps: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    schedule: Schedule,
    ablator: Ablator,
    pool: str | None = None,
    *,
    data_index: Sequence[int] | None = None,
    noise: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    adapter: Any = None,
) -> list[MaskRun]:
    """Train K unit masks to convergence in one loop; returns one :class:`MaskRun` per mask.

    Args:
        model: the frozen TransformerLens model.
        train, val: one ``EncodedProblems`` each, or lists of them (one per dataset).
        cfg: a ``MaskSearchConfig`` (parametrisation, defaults of lr / init / l0_weight,
            batch size, unit kinds and layers).
        hps, seeds: per mask, hyperparameter overrides and the seed (data order, noise).
        schedule: budget and stopping rule (the same for every mask).
        ablator: the ablation of every forward pass (training and validation).
        data_index: per mask, which training/validation set it uses (default: all the first).
        noise: the hard-concrete noise (``experiment.batched``: exact / device / auto);
            autocast_dtype: autocast of the frozen model (e.g. bfloat16 on GPUs).
        adapter: the model's adapter; required for inputs without tokens (e.g. images), which
            are scored by ``adapter.ooo_logits`` on the K masks' stacked minibatches (units
            from ``adapter.unit_map``; zero or mean ablation).
    """
    args = (model, train, val, cfg, hps, seeds, schedule, ablator, pool, data_index, noise)
    loop = _BatchedUnitTrainer(*args, autocast_dtype, adapter)
    return loop.run(progress, f"{len(loop.alive)} masks")


class _BatchedUnitTrainer(MaskTrainer):
    """:func:`train_masks_converged`: K unit masks in one
    :class:`~subroutine_circuits.experiment.batched.BatchedUnitMask` (rows follow the alive
    masks), token inputs through padded passes, other inputs through the adapter."""

    def __init__(
        self,
        model,
        train,
        val,
        cfg,
        hps,
        seeds,
        schedule,
        ablator,
        pool,
        data_index,
        noise,
        autocast_dtype,
        adapter=None,
    ):
        from subroutine_circuits.experiment.batched import (
            BatchedUnitMask,
            StackedAdam,
            _concat_inputs,
            _concat_problems,
            check_generic_ablator,
            has_token_inputs,
            mask_configs,
        )
        from subroutine_circuits.models.readout import check_tokens, resolve_pool

        hps, seeds = [dict(h) for h in hps], [int(s) for s in seeds]
        if len(hps) != len(seeds) or not hps:
            raise ValueError(f"need one seed per hyperparameter point: {len(hps)} vs {len(seeds)}")
        if len({repr(h.get("layers", cfg.layers)) for h in hps}) != 1:
            raise ValueError("batched masks must share one unit map (same 'layers' for all)")
        trains = list(train) if isinstance(train, (list, tuple)) else [train]
        self.vals = list(val) if isinstance(val, (list, tuple)) else [val]
        which = [0] * len(hps) if data_index is None else [int(d) for d in data_index]
        if len(which) != len(hps) or not all(0 <= d < len(trains) for d in which):
            raise ValueError("data_index must give each mask a training set index")
        if len(self.vals) != len(trains):
            raise ValueError(f"{len(trains)} training sets but {len(self.vals)} validation sets")
        for name, sets in (("training", trains), ("validation", self.vals)):
            if any(len(d) == 0 for d in sets):
                raise ValueError(f"a {name} set is empty")
        self.model, self.cfg, self.schedule, self.hps, self.seeds = model, cfg, schedule, hps, seeds
        self.adapter = adapter
        self.tokens = all(has_token_inputs(d) for d in [*trains, *self.vals])
        self.autocast_dtype = autocast_dtype
        for p in model.parameters():
            p.requires_grad_(False)
        device = next(model.parameters()).device
        layers = hps[0].get("layers", cfg.layers)
        if self.tokens:
            self.pool = resolve_pool(model, pool)
            self.data, offsets = _concat_problems([d.to(device) for d in trains])
            self.lmax_cpu = self.data.lengths.amax(1).cpu()
            self.data.inputs["tokens"] = self.data.tokens[..., : int(self.lmax_cpu.max())]
            flat = self.data.tokens.reshape(-1, self.data.tokens.shape[-1])
            check_tokens(model, flat, self.data.lengths.reshape(-1))
            self.unit_map = padded.tl_unit_map(model, layers=layers, kinds=cfg.unit_kinds)
        else:  # e.g. images: the adapter scores the inputs and names the units
            if adapter is None:
                raise ValueError(
                    "training sets without token inputs need adapter=... (the model's adapter)"
                )
            check_generic_ablator(ablator)
            self.pool = ""
            self.data, offsets = _concat_inputs([d.to(device) for d in trains])
            self.unit_map = adapter.unit_map(kinds=cfg.unit_kinds, layers=layers)
        self.ablator = ablator.to(device)
        self.cfgs = mask_configs(cfg, hps, seeds)
        for c in self.cfgs:
            c.ablation = ablator.kind
        self.bm = BatchedUnitMask(self.unit_map, self.cfgs, None, noise, self.ablator).to(device)
        self.opt = StackedAdam(self.bm.logits, [float(h.get("lr", cfg.lr)) for h in hps])
        self.sparsity = DensityMultiplier.for_grid(cfg, hps).to(device)
        batches = [
            _Batch(i, d, len(trains[d]), offsets[d], s, schedule.plateau(target_density(cfg, h)))
            for i, (d, s, h) in enumerate(zip(which, seeds, hps))
        ]
        super().__init__(schedule, batches, validates=True)
        self.device = device
        self.pad_state: dict = {}
        #: the hooks a readout-only training pass runs at the readout position only (None:
        #: every position)
        self.readout = None
        if self.tokens:
            self.readout = padded.readout_hook_names(model, self.pool, ablator.kind)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.bm.train()

    def step(self, step: int) -> None:
        """One optimiser step of every alive mask (no host sync)."""
        bsz, bm, k = int(self.cfg.batch_size), self.bm, len(self.alive)
        idx_list = [j for b in self.alive for j in b.draw(bsz)]
        idx_cpu = torch.tensor(idx_list)
        idx = idx_cpu.to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        bm.new_step()
        if not self.tokens:  # the K masks' minibatches are K equal slices of one batch
            self._image_step(idx, k, bsz, autocast)
            return self._after_step(step)
        width = int(self.lmax_cpu[idx_cpu].max())
        tokens, lengths = self.data.tokens[idx][..., :width], self.data.lengths[idx]
        bm.begin_batch(self.model, tokens.reshape(-1, width), lengths.reshape(-1), self.pad_state)
        l0 = self.sparsity.weight([b.i for b in self.alive])
        n_stim = tokens.shape[1]
        # masks per forward/backward pass: all K unless the worker's GPU memory budget says
        # fewer (memory.rows_per_pass; the CPU has no budget: one pass, as always)
        per = max(
            1, rows_per_pass(self.model, width, k * bsz * n_stim, grad=True) // (bsz * n_stim)
        )
        penalty_done = False

        def masks(r: range) -> None:
            """Forward and backward of masks ``r`` (gradients accumulate in the logits)."""
            nonlocal penalty_done
            whole = len(r) == k
            rows = slice(r.start * bsz, r.stop * bsz)
            states = self._noise_states(r)
            try:
                with contextlib.nullcontext() if whole else bm.serving(r.start, r.stop):
                    bm.readout_hooks = self.readout
                    try:
                        with autocast:
                            scores = padded.ooo_scores_padded(
                                self.model, tokens[rows], lengths[rows], self.pool,
                                self.pad_state, self.readout is not None,
                            )  # fmt: skip
                    finally:
                        bm.readout_hooks = None
                    ce = F.cross_entropy(scores.float(), self.data.odd[idx[rows]],
                                         reduction="none").view(len(r), bsz).mean(1)  # fmt: skip
                    loss_k = ce
                    if whole:  # one pass: the penalty in the same graph, as always
                        loss_k = ce + self._sparsity_term(l0)
                    self.bad |= ~torch.isfinite(loss_k).all()
                    loss_k.sum().backward()
            except OutOfMemoryError:  # retried with fewer masks: replay their exact noise
                self._restore_noise(r, states)
                raise
            penalty_done = penalty_done or whole

        self.opt.zero_grad()
        run_chunked(masks, range(k), per, label="masks", key="converge.train")
        if not penalty_done:
            pen = self._sparsity_term(l0)
            self.bad |= ~torch.isfinite(pen).all()
            pen.sum().backward()
        self.opt.step()
        self._update_sparsity()
        self._after_step(step)

    def _update_sparsity(self) -> None:
        """Dual ascent of the alive masks' target-density multipliers (no host sync; masks
        without a target keep their fixed l0 weight)."""
        if not self.sparsity.any_target:
            return
        with torch.no_grad():
            density = self.bm.soft_count() / max(1, self.unit_map.n_units)
        self.sparsity.update([b.i for b in self.alive], density)

    def _image_step(self, idx: Tensor, k: int, bsz: int, autocast: Any) -> None:
        """One optimiser step of the alive masks on inputs without tokens (images), scored by
        the adapter. The K masks' slices go through the model in passes of at most
        :data:`CPU_IMAGE_ROWS` images on the CPU (or the adapter's ``cpu_rows``; one pass
        elsewhere, halved while it runs out of GPU memory), each pass backward at once; the
        gradient is the one of a single pass (each mask only sees its slice)."""
        bm = self.bm
        n_stim = int(next(iter(self.data.inputs.values())).shape[1])
        rows_cpu = int(getattr(self.adapter, "cpu_rows", CPU_IMAGE_ROWS))
        per = k if self.device.type != "cpu" else max(1, rows_cpu // (bsz * n_stim))
        l0 = self.sparsity.weight([b.i for b in self.alive])

        def masks(r: range) -> None:
            rows = idx[r.start * bsz : r.stop * bsz]
            states = self._noise_states(r)
            try:
                with bm.serving(r.start, r.stop), autocast:
                    inputs = {n: v[rows] for n, v in self.data.inputs.items()}
                    scores = self.adapter.ooo_logits(inputs)
                ce = F.cross_entropy(scores.float(), self.data.odd[rows], reduction="none")
                ce_k = ce.view(len(r), bsz).mean(1)
                self.bad |= ~torch.isfinite(ce_k).all()
                ce_k.sum().backward()
            except OutOfMemoryError:  # retried with fewer masks: replay their exact noise
                self._restore_noise(r, states)
                raise

        self.opt.zero_grad()
        run_chunked(masks, range(k), per, label="masks", key="converge.images")
        pen = self._sparsity_term(l0)
        self.bad |= ~torch.isfinite(pen).all()
        pen.sum().backward()
        self.opt.step()
        self._update_sparsity()

    def _sparsity_term(self, weight: Tensor) -> Tensor:
        """The alive masks' sparsity terms (``DensityMultiplier.penalty``), ``[k]``."""
        rows, n = [b.i for b in self.alive], max(1, self.unit_map.n_units)
        soft = self.bm.soft_count() if self.sparsity.any_target else None
        return self.sparsity.penalty(rows, weight, self.bm.penalty(), n, soft)

    def _noise_states(self, r: range) -> list[Tensor]:
        """The exact-noise generator states of masks ``r`` before a pass: a pass that runs out
        of memory is retried with fewer masks and must draw the same noise."""
        return [g.get_state() for g in self.bm.generators[r.start : r.stop]]

    def _restore_noise(self, r: range, states: list[Tensor]) -> None:
        """Put back the generator states :meth:`_noise_states` saved."""
        for g, st in zip(self.bm.generators[r.start : r.stop], states):
            g.set_state(st)

    def _after_step(self, step: int) -> None:
        """The temperature schedule after an optimiser step (the loop counts the steps)."""
        bm = self.bm
        if bm.parametrization == "continuous":
            with torch.no_grad():
                bm.temperature.fill_(self.schedule.temperature(step))
        for b in self.alive:
            b.temp = self.schedule.temperature(step) if bm.parametrization == "continuous" else None

    def training(self) -> contextlib.AbstractContextManager[Any]:
        """The masks' hooks and the key-padding hooks on the model."""
        from subroutine_circuits.experiment.batched import _hooks_on

        stack = contextlib.ExitStack()
        stack.enter_context(self.bm.applied(self.model))
        stack.enter_context(_hooks_on(self.model, padded.padding_hooks(self.model, self.pad_state)))
        return stack

    def validate(self, step: int) -> tuple[list[float], list[float]]:
        """Validation accuracy of every alive mask's binary form on its own validation set."""
        if bool(self.bad):
            raise ValueError(f"mask training produced a non-finite loss by step {step}")
        self.bm.eval()
        keep = self.bm.binary()
        acc = _evaluate(
            self.model,
            keep,
            self.vals,
            [b.data_idx for b in self.alive],
            self.unit_map,
            self.ablator,
            self.pool,
            self.autocast_dtype,
            self.adapter,
        )
        self.bm.train()
        return acc, keep.float().mean(1).tolist()

    def snapshot(self, row: int) -> Tensor:
        """Row ``row`` of the mask logits."""
        return self.bm.logits.detach()[row].clone()

    def keep_rows(self, rows: list[int]) -> None:
        _select_rows(self.bm, self.opt, rows)

    def results(self) -> list[MaskRun]:
        """One MaskRun per mask, in input order, each with its best checkpoint."""
        out: list[MaskRun | None] = [None] * len(self.hps)
        for b in self.done + self.alive:
            mask = _unit_mask(self.unit_map, self.cfgs[b.i], b.best, b.temp, self.ablator)
            p = b.plateau
            out[b.i] = MaskRun(
                mask,
                p.best_acc,
                p.best_density,
                b.steps,
                p.best_step,
                b.temp,
                b.steps < self.schedule.steps,
                list(p.history),
            )
        return out  # type: ignore[return-value]


def _unit_mask(
    unit_map: UnitMap,
    cfg: MaskConfig,
    logits: Float[Tensor, " n"],
    temp: float | None,
    ablator: Ablator,
) -> UnitMask:
    """A trained :class:`UnitMask` (eval mode, CPU) holding ``logits`` and the ablator's values."""
    m = UnitMask(unit_map, cfg)
    flat = logits.detach().cpu()
    offs = unit_map.offsets()
    with torch.no_grad():
        for part, off, g in zip(m.parts, offs, unit_map.groups):
            row = flat[off : off + g.size]
            if hasattr(part, "log_alpha"):
                part.log_alpha.copy_(row)
            else:
                part.logits.copy_(row)
                part.temperature.fill_(temp if temp is not None else 1.0)
    if ablator.kind == "mean":
        m.ablation_values = {h: v.cpu() for h, v in ablator.values.items()}
        m.readout_values = {h: v.cpu() for h, v in ablator.readout_values.items()}
    m.eval()
    return m
