"""Batched masks: K unit masks over one :class:`UnitMap` served by ONE forward pass.

The input batch is the concatenation of K equal slices (slice ``k`` = rows
``k*n : (k+1)*n``); the hook on every unit group mixes slice ``k`` with mask ``k``:
``x'[k] = m_k * x[k] + (1 - m_k) * a_k`` (``a_k`` zero or mask ``k``'s mean-ablation values).
Because a transformer treats the rows of a batch independently, mask ``k`` only ever sees its
own slice, so K masks trained or evaluated together give the results of K separate runs.

- :class:`BatchedUnitMask`: K trainable masks (hard concrete or continuous sparsification) held
  as one ``[K, n_units]`` logit tensor; per-mask init, temperature growth, seeds and ablation
  values; :meth:`BatchedUnitMask.unbatch` returns ordinary :class:`UnitMask` objects.
- :class:`StackedAdam`: Adam on a ``[K, ...]`` tensor with one learning rate per row (equal to
  ``torch.optim.Adam`` with one param group per row, see the tests).
- The training loop over a :class:`BatchedUnitMask` is
  :func:`experiment.converge.train_masks_converged` (the study's engine).
- :func:`fixed_mask_scores` / :func:`evaluate_fixed_masks`: K fixed binary masks on the same
  problems in chunked forward passes; accuracies ``[K]``.
- :func:`matched_random_masks`: random subnetworks keeping as many units per (layer, kind) as a
  given one, drawn in one vectorised call; :func:`n_distinct` counts distinct draws.

Noise of hard-concrete masks: ``noise="exact"`` draws every group's uniforms from mask ``k``'s own
CPU ``torch.Generator`` (seeded with its seed) when the group's hook fires, exactly as
``train_mask`` does, so a batched run reproduces the separate runs; ``noise="device"`` draws one
``[n_units]`` vector per mask and step from a per-mask generator on the model's device (no host
work, no transfers: the fast path on GPUs; reproducible per seed and independent of the other
masks of the batch, but on a GPU not equal to ``train_mask``'s CPU stream; on the CPU it equals
``exact`` whenever the hooks fire in unit-map order, as for ``adapters.tl_unit_map``).
``"auto"`` picks ``exact`` on CPU and ``device`` elsewhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from subroutine_circuits.adapters import padded
from subroutine_circuits.masks.ablation import mix
from subroutine_circuits.masks.ablator import AblationState, Ablator
from subroutine_circuits.masks.parametrization import Ablation, MaskConfig
from subroutine_circuits.masks.unit_mask import UnitMask
from subroutine_circuits.masks.units import UnitMap
from subroutine_circuits.memory import run_chunked

NOISE_MODES = ("auto", "exact", "device")
_EPS = 1e-6
#: Most sequences per fixed-mask evaluation pass on accelerators (fewer when the worker's
#: memory budget says so, :func:`subroutine_circuits.memory.rows_per_pass`).
DEVICE_ROWS = 16384


# ---------------------------------------------------------------------------- mixing
def mix_slices(
    x: Float[Tensor, "batch ..."],
    m: Float[Tensor, "k units"],
    axis: int,
    a: Float[Tensor, "k ..."] | None = None,
) -> Float[Tensor, "batch ..."]:
    """``x'[k] = m_k * x[k] + (1 - m_k) * a_k`` for the K equal slices of ``x``'s batch axis 0.

    ``m`` holds one mask per slice along the unit axis ``axis`` of ``x``; ``a`` (None = zero
    ablation) is ``[K, *broadcastable to x's shape]``.
    """
    k = m.shape[0]
    if x.shape[0] % k != 0:
        raise ValueError(
            f"batch of {x.shape[0]} rows cannot be split into {k} equal mask slices "
            "(the batch must be the concatenation of one equal slice per mask)"
        )
    xv = x.reshape(k, x.shape[0] // k, *x.shape[1:])
    shape = [k] + [1] * x.dim()
    shape[1 + axis] = m.shape[1]
    # a boolean mask (fixed masks) selects exactly in one op (masks.ablation.mix: the same
    # numbers as the float formula with 0/1 masks); a float mask mixes (training)
    mv = m.to(device=x.device) if m.dtype == torch.bool else m.to(device=x.device, dtype=x.dtype)
    mv = mv.reshape(shape)
    a = None if a is None else a.to(device=x.device, dtype=x.dtype)
    return mix(xv, mv, a).reshape(x.shape)  # the one ablation formula (masks.ablation)


def _stack_ablation(
    unit_map: UnitMap,
    values: Sequence[Mapping[str, Tensor] | None],
    device: torch.device | str | None = None,
) -> dict[str, Tensor] | None:
    """Per hook, the K ablation tensors stacked as ``[K, 1, ...]`` (None entries = zeros).

    Returns None when every mask uses zero ablation (the cheaper ``x * m`` path).
    """
    if all(v is None for v in values):
        return None
    out: dict[str, Tensor] = {}
    for g in unit_map.groups:
        ref = None
        for v in values:
            if v is not None:
                if g.hook_name not in v:
                    raise ValueError(f"ablation values missing for hook {g.hook_name!r}")
                ref = torch.as_tensor(v[g.hook_name])
                break
        rows = []
        for i, v in enumerate(values):
            t = torch.zeros_like(ref) if v is None else torch.as_tensor(v[g.hook_name])
            if t.shape != ref.shape:
                raise ValueError(
                    f"ablation values of mask {i} at {g.hook_name!r} have shape "
                    f"{tuple(t.shape)}, mask 0 has {tuple(ref.shape)}"
                )
            if t.dim() > g.axis and t.shape[0] != 1:
                raise ValueError(
                    f"batched masks need batch-broadcastable (mean) ablation values; "
                    f"{g.hook_name!r} of mask {i} has shape {tuple(t.shape)} (resample?)"
                )
            rows.append(t.detach().float())
        stacked = torch.stack(rows)  # [K, 1, ...]
        out[g.hook_name] = stacked if device is None else stacked.to(device)
    return out


def _ablation_of(mask: UnitMask) -> dict[str, Tensor] | None:
    """A unit mask's ablation values for batching (None for zero ablation)."""
    if mask.ablation == Ablation.ZERO:
        return None
    if mask.ablation == Ablation.RESAMPLE:
        raise ValueError("batched masks support zero and mean ablation, not resample")
    missing = [g.hook_name for g in mask.unit_map.groups if g.hook_name not in mask.ablation_values]
    if missing:
        raise ValueError(f"mean ablation values missing for {missing}; call set_mean(...) first")
    return mask.ablation_values


@contextlib.contextmanager
def _hooks_on(model: nn.Module, hooks: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Add forward hooks ``(hook_name, fn)`` for the block; exactly these are removed after."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise ValueError(f"{type(model).__name__} is not a HookedRootModule (no hook_dict)")
    handles = []
    try:
        for name, fn in hooks:
            if name not in hook_dict:
                raise ValueError(f"unknown hook name {name!r}: the model has no such hook")
            handles.append(hook_dict[name].register_forward_hook(_wrap(fn, hook_dict[name])))
        yield
    finally:
        for h in handles:
            h.remove()


def _wrap(fn, hook_point):
    """Adapt ``fn(x, hook)`` to a torch forward hook ``(module, args, output)``.

    A hook point with a ``hook_conversion`` (TransformerBridge aliases, on TransformerLens 3.9
    and 4.x: ``blocks.{l}.attn.hook_z`` is ``attn.o.hook_in``, whose raw output is the flat
    ``[batch, pos, n_heads * d_head]``) shows ``fn`` the converted activation
    (``[batch, pos, n_heads, d_head]``) and reverts what ``fn`` returns, as
    ``HookPoint.add_hook`` does. So ``fn`` sees the layout in which ``model.hooks`` (and
    ``record_activations``, which records the mean ablation values) sees the activation.
    """

    def torch_hook(module, args, output):
        conversion = getattr(hook_point, "hook_conversion", None)
        if conversion is None:
            return fn(output, hook_point)
        result = fn(conversion.convert(output), hook_point)
        return None if result is None else conversion.revert(result)

    return torch_hook


def _mix_or_record(
    x: Tensor,
    g: Any,
    values: Callable[[], Float[Tensor, "k size"]],
    recording: dict[str, Tensor] | None,
    ablator: Ablator | None,
    state: AblationState | None,
    abl: Mapping[str, Tensor | None] | None,
    cache: dict[str, Tensor | None] | None = None,
    readout: frozenset[str] | None = None,
) -> Tensor:
    """The hook body of K masks on one group: during the clean source pass of resample
    ablation (``recording``) keep ``x`` and record it; else mix slice ``k`` with mask ``k``'s
    ``values()`` (called only then: hard-concrete values draw noise), ablating with
    ``ablator`` or the stacked per-mask values ``abl``. ``cache`` (per hook) keeps the
    ablator's replacement for later passes over the same rows (fixed masks, mean ablation).
    ``readout``: in a readout-only pass, the hooks computed at the readout position only
    (``adapters.padded.ooo_scores_padded``); theirs is the readout replacement
    (:meth:`Ablator.readout_value`)."""
    if recording is not None:
        recording[g.hook_name] = x.detach()
        return x
    if ablator is not None:
        at_readout = readout is not None and g.hook_name in readout
        key = f"{g.hook_name}@readout" if at_readout else g.hook_name
        if cache is None or key not in cache:
            a = ablator.readout_value(g, x) if at_readout else ablator.value(g, x, state)
            if cache is not None:
                cache[key] = a
        else:
            a = cache[key]
    else:
        a = None if abl is None else abl.get(g.hook_name)
    return mix_slices(x, values(), g.axis, a)


# ---------------------------------------------------------------------------- optimiser
class StackedAdam:
    """Adam (no weight decay, no amsgrad) on one ``[K, ...]`` tensor, one learning rate per row.

    Elementwise, so it equals ``torch.optim.Adam`` run on K separate row tensors with one param
    group (learning rate) each, within float rounding. The step count lives on the host: no
    device reads. ``step()`` uses ``param.grad`` (rows without gradient are left as they are
    only when the whole gradient is None).
    """

    def __init__(
        self,
        param: Tensor,
        lrs: Sequence[float] | Float[Tensor, "k"],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        lrs_t = torch.as_tensor(lrs, dtype=torch.float64).reshape(-1)
        if lrs_t.numel() != param.shape[0]:
            raise ValueError(f"{lrs_t.numel()} learning rates for {param.shape[0]} stacked rows")
        if not bool(torch.isfinite(lrs_t).all()) or bool((lrs_t < 0).any()):
            raise ValueError(f"learning rates must be finite and >= 0, got {lrs_t.tolist()}")
        self.param = param
        self.lrs = lrs_t
        self._lrs_dev = lrs_t.to(param.device)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.n_steps = 0
        self._shape = [param.shape[0]] + [1] * (param.dim() - 1)

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every row with its own learning rate."""
        g = self.param.grad
        if g is None:
            return
        self.n_steps += 1
        t = self.n_steps
        self.exp_avg.lerp_(g, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bc1 = 1 - self.beta1**t
        bc2_sqrt = (1 - self.beta2**t) ** 0.5
        step_size = (self._lrs_dev / bc1).to(self.param.dtype).view(self._shape)
        denom = (self.exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
        # same order as torch's addcdiv_: (step_size * exp_avg) / denom
        self.param.sub_(step_size * self.exp_avg / denom)

    def zero_grad(self) -> None:
        """Drop the gradient (``set_to_none``)."""
        self.param.grad = None


# ---------------------------------------------------------------------------- batched masks
class BatchedUnitMask(nn.Module):
    """K trainable unit masks over one unit map, applied to K slices of one batch.

    Args:
        unit_map: the units (one map for all K masks).
        cfgs: one :class:`MaskConfig` per mask (parametrisation, beta/gamma/zeta must agree;
            ``init``, ``temp_growth``, ``seed`` and ``ablation`` may differ).
        ablation_values: per mask ``{hook_name: tensor}`` mean values (or None for zero
            ablation); a single mapping is shared by all masks.
        noise: ``"auto"``, ``"exact"`` or ``"device"`` (see the module docstring).
        ablator: one :class:`~subroutine_circuits.masks.ablator.Ablator` for all masks
            (position-aware mean, zero or resample) instead of ``ablation_values``.

    In ``train()`` mode the hooks use soft / sampled masks, in ``eval()`` mode the binary masks.
    """

    def __init__(
        self,
        unit_map: UnitMap,
        cfgs: Sequence[MaskConfig],
        ablation_values: Sequence[Mapping[str, Tensor] | None] | Mapping[str, Tensor] | None = None,
        noise: str = "auto",
        ablator: Ablator | None = None,
    ):
        super().__init__()
        if not isinstance(unit_map, UnitMap):
            raise ValueError(f"BatchedUnitMask needs a UnitMap, got {type(unit_map).__name__}")
        cfgs = list(cfgs)
        if not cfgs:
            raise ValueError("BatchedUnitMask needs at least one MaskConfig")
        if noise not in NOISE_MODES:
            raise ValueError(f"unknown noise mode {noise!r}; choose one of {list(NOISE_MODES)}")
        c0 = cfgs[0]
        for i, c in enumerate(cfgs):
            for f in ("parametrization", "beta", "gamma", "zeta"):
                if getattr(c, f) != getattr(c0, f):
                    raise ValueError(
                        f"all batched masks must share {f}: mask {i} has {getattr(c, f)!r}, "
                        f"mask 0 has {getattr(c0, f)!r}"
                    )
            if Ablation.parse(c.ablation) == Ablation.REINIT:
                raise ValueError("ablation 'reinit' applies to weight masks; use zero or mean")
            if Ablation.parse(c.ablation) == Ablation.RESAMPLE and ablation_values is not None:
                raise ValueError("batched resample ablation comes from an Ablator (use_ablator)")
        self.unit_map = unit_map
        self.ablator: Ablator | None = None  # set by use_ablator: replaces ablation_values
        self.ablation_state: AblationState | None = None
        self._recording: dict[str, Tensor] | None = None
        self.cfgs = cfgs
        self.k = len(cfgs)
        self.parametrization = c0.parametrization
        self.beta, self.gamma, self.zeta = float(c0.beta), float(c0.gamma), float(c0.zeta)
        self.noise = noise
        n = unit_map.n_units
        init = torch.tensor([c.init_value for c in cfgs], dtype=torch.float32)
        self.logits = nn.Parameter(init[:, None].expand(self.k, n).clone())
        self.register_buffer("temperature", torch.ones(self.k))
        self.register_buffer(
            "temp_growth", torch.tensor([float(c.temp_growth) for c in cfgs], dtype=torch.float32)
        )
        self.slices = []
        for off, g in zip(unit_map.offsets(), unit_map.groups):
            self.slices.append(slice(off, off + g.size))
        # exact noise: one CPU generator per mask, seeded like UnitMask's
        self.generators = [torch.Generator().manual_seed(int(c.seed)) for c in cfgs]
        self._device_generators: list[torch.Generator] | None = None
        self._step_noise: Tensor | None = None
        self._values: Tensor | None = None
        self._rows: slice | None = None  # masks served by the next passes (None: all K)
        #: during a readout-only pass (``adapters.padded.ooo_scores_padded``), the hooks that
        #: see only the readout position (one per row); None otherwise
        self.readout_hooks: frozenset[str] | None = None
        # ablation values per mask
        if ablation_values is None or isinstance(ablation_values, Mapping):
            per_mask = [ablation_values] * self.k
        else:
            per_mask = list(ablation_values)
            if len(per_mask) != self.k:
                raise ValueError(f"{len(per_mask)} ablation value sets for {self.k} masks")
        for i, (c, v) in enumerate(zip(cfgs, per_mask)):
            abl = Ablation.parse(c.ablation)
            if abl == Ablation.MEAN and v is None and ablator is None:
                raise ValueError(f"mask {i} uses mean ablation but has no ablation values")
            if abl == Ablation.ZERO:
                per_mask[i] = None
        self.ablation_values = [None if v is None else dict(v) for v in per_mask]
        self._abl = _stack_ablation(unit_map, self.ablation_values)
        if ablator is not None:
            self.use_ablator(ablator)

    # ------------------------------------------------------------------ construction helpers
    def _resolved_noise(self) -> str:
        if self.noise != "auto":
            return self.noise
        return "exact" if self.logits.device.type == "cpu" else "device"

    def _apply(self, fn, recurse=True):  # keep the stacked ablation values on our device
        out = super()._apply(fn, recurse)
        if self._abl is not None:
            self._abl = {k: fn(v) for k, v in self._abl.items()}
        return out

    # ------------------------------------------------------------------ mask values
    def _hc(self, la: Tensor, u: Tensor) -> Tensor:
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def binary(self) -> Bool[Tensor, "k n_units"]:
        """The deterministic binary masks (``s > 0`` / hard-concrete gate mean ``> 0.5``)."""
        la = self.logits.detach()
        if self.parametrization == "continuous":
            return la > 0
        s = torch.sigmoid(la)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0) > 0.5

    def penalty(self) -> Float[Tensor, " k"]:
        """Per mask: expected L0 (hard concrete) or ``sum sigmoid(T*s)`` (continuous)."""
        if self.parametrization == "continuous":
            return torch.sigmoid(self.temperature[:, None] * self.logits).sum(1)
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return torch.sigmoid(self.logits - shift).sum(1)

    def soft_count(self) -> Float[Tensor, " k"]:
        """Per mask, a differentiable count of the units the binary mask keeps (what a target
        density constrains): ``sum sigmoid(logits)`` (hard concrete: above 1/2 exactly for
        kept units) or ``sum sigmoid(T*s)`` (continuous)."""
        if self.parametrization == "continuous":
            return self.penalty()
        return torch.sigmoid(self.logits).sum(1)

    def new_step(self) -> None:
        """Start a forward pass: with ``noise="device"`` draw this step's uniforms on device."""
        self._step_noise = None
        if not self.training or self.parametrization != "hard_concrete":
            return
        if self._resolved_noise() != "device":
            return
        dev = self.logits.device
        if self._device_generators is None or self._device_generators[0].device != dev:
            self._device_generators = [
                torch.Generator(device=dev).manual_seed(int(c.seed)) for c in self.cfgs
            ]
        n = self.logits.shape[1]
        u = torch.stack(
            [torch.rand(n, generator=g, device=dev) for g in self._device_generators]
        ).clamp_(_EPS, 1 - _EPS)
        self._step_noise = u

    def group_values(self, gi: int) -> Float[Tensor, "k size"]:
        """The K masks of unit group ``gi`` for the current forward pass (only the masks of
        :meth:`serving` inside such a block)."""
        sl, r = self.slices[gi], self._rows if self._rows is not None else slice(None)
        la = self.logits[r, sl]
        if not self.training:
            return self.binary()[r, sl].to(la.dtype)
        if self.parametrization == "continuous":
            return torch.sigmoid(self.temperature[r, None] * la)
        if self._step_noise is not None:
            u = self._step_noise[r, sl]
        else:  # exact: each mask's CPU generator, in hook-firing order, as UnitMask does
            size = sl.stop - sl.start
            u = torch.stack(
                [torch.rand((size,), generator=g).clamp(_EPS, 1 - _EPS)
                 for g in self.generators[r]]
            ).to(la.device, la.dtype)  # fmt: skip
        return self._hc(la, u)

    @contextlib.contextmanager
    def serving(self, k0: int, k1: int) -> Iterator[BatchedUnitMask]:
        """Inside the block the hooks serve masks ``k0:k1`` only: the batch is their
        ``k1 - k0`` equal slices, in mask order. Used to split the K masks' batch into several
        forward (and backward) passes: on the CPU, where one pass over a large batch of images
        runs slower per image than a few smaller ones, and on a GPU whose memory budget a
        single pass would exceed. Each mask draws its exact noise from its own generator in
        hook order (device noise: its row of the step's draw), so split passes give the same
        masks as one pass. A per-pass ablation state (:meth:`begin_batch` over all K slices:
        position-aware mean, resample) is served sliced to the masks' slices.
        """
        if not 0 <= k0 < k1 <= self.k:
            raise ValueError(f"mask rows {k0}:{k1} out of range for {self.k} masks")
        old, self._rows = self._rows, slice(k0, k1)
        old_state = self.ablation_state
        if old_state is not None:
            self.ablation_state = _slice_state(old_state, k0, k1)
        try:
            yield self
        finally:
            self._rows = old
            self.ablation_state = old_state

    def step_temperature(self) -> None:
        """Continuous masks: multiply each mask's temperature by its ``temp_growth``."""
        with torch.no_grad():
            self.temperature.mul_(self.temp_growth)

    def _hook(self, gi: int, x: Tensor, hook=None) -> Tensor:
        g = self.unit_map.groups[gi]
        if x.dim() <= g.axis or x.shape[g.axis] != g.size:
            raise ValueError(
                f"activation at {g.hook_name!r} has shape {tuple(x.shape)}; expected size "
                f"{g.size} on axis {g.axis}"
            )
        abl = self._abl
        if abl is not None and self._rows is not None:  # the rows of the masks being served
            a = abl.get(g.hook_name)
            abl = None if a is None else {g.hook_name: a[self._rows]}
        return _mix_or_record(x, g, lambda: self.group_values(gi), self._recording,
                              self.ablator, self.ablation_state, abl,
                              readout=self.readout_hooks)  # fmt: skip

    def use_ablator(self, ablator: Ablator) -> BatchedUnitMask:
        """Ablate with ``ablator`` (shared by all K masks; its kind must be theirs)."""
        kinds = {Ablation.parse(c.ablation).value for c in self.cfgs}
        if kinds != {ablator.kind}:
            raise ValueError(f"the masks ablate with {sorted(kinds)}, the ablator {ablator.kind}")
        ablator.check(self.unit_map)
        self.ablator = ablator
        return self

    def begin_batch(
        self,
        model: nn.Module,
        tokens: Int[Tensor, "rows pos"],
        lengths: Int[Tensor, " rows"],
        pad_state: dict,
    ) -> None:
        """Prepare the ablation of the next forward pass over ``tokens`` (the K slices)."""
        if self.ablator is None:
            return

        def record_rows(rows: range, tok: Tensor, ln: Tensor) -> dict[str, Tensor]:
            self._recording = {}
            try:
                with torch.no_grad():
                    part = slice(rows.start, rows.stop)
                    padded.padded_pass(model, tok[part], ln[part], pad_state)
                return self._recording
            finally:
                self._recording = None

        def record(tok: Tensor, ln: Tensor) -> dict[str, Tensor]:
            """The clean source pass, in row chunks within the worker's memory budget."""
            from subroutine_circuits.memory import rows_per_pass

            chunk = rows_per_pass(model, tok.shape[1], tok.shape[0])
            parts = run_chunked(lambda r: record_rows(r, tok, ln), range(tok.shape[0]), chunk,
                                label="rows", key="batched.record")  # fmt: skip
            if len(parts) == 1:
                return parts[0]
            return {h: torch.cat([p[h] for p in parts]) for h in parts[0]}

        self.ablation_state = self.ablator.begin(tokens, lengths, self.k, False, record)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[BatchedUnitMask]:
        """Hooks on ``model`` inside the block; the batch must be K equal slices, mask order.

        In training with ``noise="device"`` call :meth:`new_step` before every forward pass.
        """
        self.unit_map.validate(model)
        if self.ablator is None and any(c.ablation == "resample" for c in self.cfgs):
            raise ValueError("resample ablation needs an Ablator: call use_ablator(...) first")
        hooks = [
            (g.hook_name, (lambda gi: lambda x, hook: self._hook(gi, x, hook))(i))
            for i, g in enumerate(self.unit_map.groups)
        ]
        with _hooks_on(model, hooks):
            yield self

    # ------------------------------------------------------------------ results
    def check_finite(self) -> None:
        """Raise ValueError naming the masks whose logits contain NaN/inf."""
        bad = (~torch.isfinite(self.logits.detach())).any(1)
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(f"batched mask logits of masks {idx} contain NaN/inf values")

    def unbatch(self) -> list[UnitMask]:
        """One ordinary :class:`UnitMask` per mask (eval mode, on the CPU), with its logits,
        temperature, generator state and ablation values."""
        out = []
        logits = self.logits.detach().cpu()
        temps = self.temperature.detach().cpu()
        for k, cfg in enumerate(self.cfgs):
            m = UnitMask(self.unit_map, cfg)
            with torch.no_grad():
                for part, sl in zip(m.parts, self.slices):
                    if self.parametrization == "continuous":
                        part.logits.copy_(logits[k, sl])
                        part.temperature.copy_(temps[k])
                    else:
                        part.log_alpha.copy_(logits[k, sl])
                        part.generator = self.generators[k]
            m.generator = self.generators[k]
            if self.ablator is not None and self.ablator.kind == "mean":
                m.ablation_values = {h: v.cpu() for h, v in self.ablator.values.items()}
                m.readout_values = {h: v.cpu() for h, v in self.ablator.readout_values.items()}
            elif self.ablation_values[k] is not None:
                m.ablation_values = {
                    h: v.detach().cpu() for h, v in self.ablation_values[k].items()
                }
            m.eval()
            out.append(m)
        return out


def _slice_state(state: AblationState, k0: int, k1: int) -> AblationState:
    """The ablation state of mask slices ``k0:k1`` of a state made for all K slices (a state
    shared by every slice, leading size 1, is kept whole)."""

    def part(t: Tensor) -> Tensor:
        return t if t.shape[0] == 1 and state.k != 1 else t[k0:k1]

    return AblationState(
        k=k1 - k0,
        ro=None if state.ro is None else part(state.ro),
        acts={h: part(a) for h, a in state.acts.items()},
        recording=state.recording,
    )


def _concat_problems(datasets: Sequence[Any]) -> tuple[Any, list[int]]:
    """Concatenate EncodedProblems (token widths padded to the widest); returns offsets."""
    from subroutine_circuits.adapters.base import EncodedProblems

    width = max(d.tokens.shape[-1] for d in datasets)
    toks, lens, odds, offsets, acc = [], [], [], [], 0
    for d in datasets:
        t = d.tokens
        if t.shape[-1] < width:
            t = F.pad(t, (0, width - t.shape[-1]))
        toks.append(t)
        lens.append(d.lengths)
        odds.append(d.odd)
        offsets.append(acc)
        acc += len(d)
    inputs = {"tokens": torch.cat(toks), "lengths": torch.cat(lens)}
    return EncodedProblems(inputs, torch.cat(odds)), offsets


def has_token_inputs(data: Any) -> bool:
    """Whether EncodedProblems hold token inputs (``tokens`` and ``lengths``: text models);
    other inputs (e.g. ``images``) go through the model adapter (:func:`fixed_mask_scores`,
    ``experiment.converge.train_masks_converged``)."""
    return "tokens" in data.inputs and "lengths" in data.inputs


def _concat_inputs(datasets: Sequence[Any]) -> tuple[Any, list[int]]:
    """Concatenate EncodedProblems of non-token inputs (equal shapes after the batch axis);
    returns offsets."""
    from subroutine_circuits.adapters.base import EncodedProblems

    names = sorted(datasets[0].inputs)
    for i, d in enumerate(datasets):
        if sorted(d.inputs) != names:
            raise ValueError(f"dataset {i} has inputs {sorted(d.inputs)}, dataset 0 has {names}")
        for n in names:
            if d.inputs[n].shape[1:] != datasets[0].inputs[n].shape[1:]:
                raise ValueError(
                    f"input {n!r} of dataset {i} has shape {tuple(d.inputs[n].shape[1:])} per "
                    f"problem, dataset 0 {tuple(datasets[0].inputs[n].shape[1:])}"
                )
    offsets, acc = [], 0
    for d in datasets:
        offsets.append(acc)
        acc += len(d)
    inputs = {n: torch.cat([d.inputs[n] for d in datasets]) for n in names}
    return EncodedProblems(inputs, torch.cat([d.odd for d in datasets])), offsets


def check_generic_ablator(ablator: Ablator | None) -> None:
    """Raise ValueError for ablations that need token positions (resample, position-aware
    mean) on inputs without tokens."""
    if ablator is None:
        return
    if ablator.kind == "resample":
        raise ValueError(
            "resample ablation needs token inputs (tokens and lengths); use zero or mean "
            "ablation for other inputs (e.g. images)"
        )
    if ablator.position_aware:
        raise ValueError("position-aware mean ablation needs token inputs (readout positions)")


def _repeat_rows(inputs: Mapping[str, Tensor], m: int) -> dict[str, Tensor]:
    """Every input tensor repeated ``m`` times along the batch axis (copy ``i`` = rows
    ``i*b:(i+1)*b``, as :func:`mix_slices` splits them)."""
    return {n: v.repeat(m, *([1] * (v.dim() - 1))) for n, v in inputs.items()}


# ---------------------------------------------------------------------------- training
def mask_configs(cfg: Any, hps: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> list:
    """The MaskConfig of each run, built as ``experiment.search.make_mask`` does."""
    return [
        MaskConfig(
            parametrization=cfg.parametrization,
            init=float(hp.get("init", cfg.init)),
            ablation="zero",
            seed=int(s),
        )
        for hp, s in zip(hps, seeds)
    ]


# ---------------------------------------------------------------------------- fixed masks
def _fixed_inputs(
    masks: Sequence[UnitMask] | Bool[Tensor, "k n"],
    unit_map: UnitMap | None,
    ablation_values: Sequence[Mapping[str, Tensor] | None] | Mapping[str, Tensor] | None,
) -> tuple[UnitMap, Bool[Tensor, "k n"], list]:
    """Normalise the fixed masks to (unit map, [K, n_units] booleans, per-mask ablations)."""
    if isinstance(masks, Tensor):
        if unit_map is None:
            raise ValueError("a [K, n_units] mask tensor needs unit_map=...")
        keep = masks
        if keep.dim() != 2 or keep.shape[1] != unit_map.n_units:
            raise ValueError(
                f"mask tensor has shape {tuple(keep.shape)}, expected [K, {unit_map.n_units}]"
            )
        if keep.dtype != torch.bool:
            if not bool(((keep == 0) | (keep == 1)).all()):
                raise ValueError("fixed masks must be boolean (or 0/1 valued)")
            keep = keep.bool()
        if ablation_values is None or isinstance(ablation_values, Mapping):
            abls = [ablation_values] * keep.shape[0]
        else:
            abls = list(ablation_values)
    else:
        masks = list(masks)
        if not masks:
            raise ValueError("no masks to evaluate")
        unit_map = masks[0].unit_map if unit_map is None else unit_map
        for i, m in enumerate(masks):
            if not isinstance(m, UnitMask):
                raise ValueError(f"mask {i} is a {type(m).__name__}, not a UnitMask")
            if m.unit_map != unit_map:
                raise ValueError(f"mask {i} has another unit map than mask 0")
        keep = torch.stack([m.flat_binary().bool() for m in masks])
        if ablation_values is not None:
            raise ValueError("ablation_values come from the UnitMask objects; do not pass both")
        abls = [_ablation_of(m) for m in masks]
    if len(abls) != keep.shape[0]:
        raise ValueError(f"{len(abls)} ablation value sets for {keep.shape[0]} masks")
    if keep.shape[0] == 0:
        raise ValueError("no masks to evaluate")
    return unit_map, keep, abls


def fixed_eval_rows(model: nn.Module, data: Any, adapter: Any = None) -> int:
    """The sequences (or images) per forward pass of :func:`fixed_mask_scores` by default: 256
    on the CPU, where large batches only spill the caches, or the adapter's ``cpu_rows`` for
    inputs without tokens; on accelerators :data:`DEVICE_ROWS`, for token inputs fewer when
    the worker's memory budget says so (:func:`subroutine_circuits.memory.rows_per_pass`)."""
    from subroutine_circuits.memory import rows_per_pass

    device = next(model.parameters()).device
    rows = 256 if device.type == "cpu" else DEVICE_ROWS
    if device.type == "cpu" and not has_token_inputs(data) and adapter is not None:
        return int(getattr(adapter, "cpu_rows", rows))  # e.g. a CNN's images
    if device.type != "cpu" and has_token_inputs(data):
        return rows_per_pass(model, int(data.lengths.max()), rows)
    return rows


#: fixed masks to score: trained unit masks (each as its binary keep set) or boolean rows
FixedMasks = Sequence[UnitMask] | Bool[Tensor, "k n_units"]


def fixed_problem_chunk(model: nn.Module, data: Any, adapter: Any = None) -> int:
    """Problems per forward pass of :func:`fixed_mask_scores` by default (its chunks of
    problems: each pass scores one chunk under one or more masks)."""
    n_stim = int(data.n_stimuli)
    return max(1, min(len(data), fixed_eval_rows(model, data, adapter) // n_stim))


@torch.no_grad()
def fixed_mask_scores(
    model: nn.Module,
    data: Any,
    masks: FixedMasks,
    pool: str | None = None,
    *,
    unit_map: UnitMap | None = None,
    ablation_values: Sequence[Mapping[str, Tensor] | None] | Mapping[str, Tensor] | None = None,
    ablator: Ablator | None = None,
    max_rows: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    adapter: Any = None,
) -> Float[Tensor, "k b 4"]:
    """OOO logits of ``data`` (EncodedProblems) under each of K fixed binary unit masks.

    ``masks`` are fixed :class:`UnitMask` objects (zero or mean ablation, values taken from
    them) or a ``[K, n_units]`` boolean tensor with ``unit_map`` and either ``ablation_values``
    (one mapping shared by all, or one per mask, None = zero) or an ``ablator``
    (:class:`~subroutine_circuits.masks.ablator.Ablator`: position-aware mean, zero or resample,
    shared by all masks). The problems are repeated once per mask along the batch, in forward
    passes of at most ``max_rows`` sequences (masks and problems chunked; default 256 on the
    CPU, where large batches only spill the caches, or the adapter's ``cpu_rows`` for inputs
    without tokens; on accelerators :data:`DEVICE_ROWS`, for token inputs fewer when the
    worker's memory budget says so, see :func:`subroutine_circuits.memory.rows_per_pass`). A
    pass that runs out of GPU memory is retried with half the masks, then half the problems
    (:func:`subroutine_circuits.memory.run_chunked`). Returned on the CPU.

    Inputs without tokens (e.g. ``{"images": [b, 4, 3, h, w]}``) need ``adapter`` (the model's
    :class:`~subroutine_circuits.adapters.base.ModelAdapter`): the problems, repeated once per
    mask, are scored by ``adapter.ooo_logits`` under the same slice-wise mask hooks (zero or
    mean ablation; ``pool`` is unused).
    """
    from subroutine_circuits.models.readout import check_tokens, resolve_pool

    device = next(model.parameters()).device
    if max_rows is None:
        max_rows = fixed_eval_rows(model, data, adapter)
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if ablator is not None and (ablation_values is not None or not isinstance(masks, Tensor)):
        raise ValueError("an ablator goes with a [K, n_units] mask tensor, without ablation_values")
    unit_map, keep, abls = _fixed_inputs(masks, unit_map, ablation_values)
    unit_map.validate(model)
    if ablator is not None:
        ablator.check(unit_map)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    if not has_token_inputs(data):
        if adapter is None:
            raise ValueError(
                f"inputs {sorted(data.inputs)} have no tokens: pass adapter=... (the model's "
                "adapter scores them)"
            )
        check_generic_ablator(ablator)
        run = _FixedRun(model, unit_map, keep.to(device=device), "")
        run.abl_all = None if ablator is not None else _stack_ablation(unit_map, abls, device)
        run.ablator = ablator
        return _generic_fixed_scores(adapter, data, run, max_rows, autocast)
    pool = resolve_pool(model, pool)
    n, n_stim, _ = data.tokens.shape
    if n == 0:
        raise ValueError("no problems to evaluate")
    lmax_cpu = data.lengths.amax(1).cpu()
    tokens_all = data.tokens[..., : int(lmax_cpu.max())].to(device)
    lengths_all = data.lengths.to(device)
    check_tokens(model, tokens_all.reshape(-1, tokens_all.shape[-1]), lengths_all.reshape(-1))
    run = _FixedRun(model, unit_map, keep.to(device=device), pool)
    run.abl_all = None if ablator is not None else _stack_ablation(unit_map, abls, device)
    run.ablator = ablator
    k = keep.shape[0]
    pc = max(1, min(n, max_rows // n_stim))
    kc = max(1, min(k, max_rows // (n_stim * pc)))
    out = torch.empty(k, n, n_stim, device=device)

    def problems(pr: range) -> None:
        p0, p1 = pr.start, pr.stop
        width = int(lmax_cpu[p0:p1].max())
        tok, lens = tokens_all[p0:p1, :, :width], lengths_all[p0:p1]

        def masks(kr: range) -> None:
            with autocast:
                scores = run.scores(tok, lens, kr.start, kr.stop)
            out[kr.start : kr.stop, p0:p1] = scores.float().view(len(kr), p1 - p0, n_stim)

        if memo is not None:  # new problems, new key padding: layer 0's z is computed again
            memo.clear()
        run.new_problems()
        run_chunked(masks, range(k), kc, label="masks", key="fixed_masks.masks")

    # nothing before blocks.0.attn.hook_z depends on the mask: a model that can, computes
    # layer 0's attention once per chunk of problems (models.native.PrefixMemo)
    prefix = getattr(model, "prefix_memo", None)
    reuse = prefix() if callable(prefix) and autocast_dtype is None else contextlib.nullcontext()
    with (
        reuse as memo,
        _hooks_on(model, run.hooks()),
        _hooks_on(model, padded.padding_hooks(model, run.pad_state)),
    ):
        run_chunked(problems, range(n), pc, label="problems", key="fixed_masks.problems")
    return out.cpu()


def _generic_fixed_scores(
    adapter: Any, data: Any, run: _FixedRun, max_rows: int, autocast: Any
) -> Float[Tensor, "k b n_stim"]:
    """:func:`fixed_mask_scores` for non-token inputs: each chunk of problems repeated once per
    mask of a chunk of masks, scored by ``adapter.ooo_logits`` under ``run``'s hooks."""
    device = run.keep_all.device
    n, n_stim, k = len(data), data.n_stimuli, run.keep_all.shape[0]
    if n == 0:
        raise ValueError("no problems to evaluate")
    inputs = {name: v.to(device) for name, v in data.inputs.items()}
    pc = max(1, min(n, max_rows // n_stim))
    kc = max(1, min(k, max_rows // (n_stim * pc)))
    out = torch.empty(k, n, n_stim, device=device)

    def problems(pr: range) -> None:
        p0, p1 = pr.start, pr.stop
        chunk = {name: v[p0:p1] for name, v in inputs.items()}
        run.new_problems()  # zero / plain mean ablation: no per-pass state

        def masks(kr: range) -> None:
            run.select(kr.start, kr.stop)
            with autocast:
                scores = adapter.ooo_logits(_repeat_rows(chunk, len(kr)))
            out[kr.start : kr.stop, p0:p1] = scores.float().view(len(kr), p1 - p0, n_stim)

        run_chunked(masks, range(k), kc, label="masks", key="fixed_masks.masks")

    with _hooks_on(run.model, run.hooks()):
        run_chunked(problems, range(n), pc, label="problems", key="fixed_masks.problems")
    return out.cpu()


class _FixedRun:
    """The hooks and per-chunk state of :func:`fixed_mask_scores`: ``keep_all`` holds the K
    boolean masks (the mix selects, :func:`mix_slices`)."""

    def __init__(self, model: nn.Module, unit_map: UnitMap, keep_all: Tensor, pool: str):
        self.model, self.unit_map, self.pool = model, unit_map, pool
        self.keep_all = keep_all.bool()
        self.slices = [slice(o, o + g.size) for o, g in zip(unit_map.offsets(), unit_map.groups)]
        self.abl_all: dict[str, Tensor] | None = None
        self.ablator: Ablator | None = None
        self.pad_state: dict = {}
        self.keep: Tensor | None = None
        self.abl: dict[str, Tensor] | None = None
        self.state: AblationState | None = None
        self.recording: dict[str, Tensor] | None = None
        #: mean ablation: the replacement per hook for the current problems (it depends on
        #: the rows and their readout positions, not on the mask), kept across mask chunks
        self.cache: dict[str, Tensor | None] = {}
        #: the hooks a readout-only pass computes at the readout position only (None: every
        #: pass runs every position; see ``adapters.padded.readout_hook_names``)
        self.readout: frozenset[str] | None = None

    def hook(self, gi: int, x: Tensor) -> Tensor:
        g = self.unit_map.groups[gi]
        keep = self.keep[:, self.slices[gi]]
        cache = self.cache if self.ablator is not None and self.ablator.kind == "mean" else None
        return _mix_or_record(x, g, lambda: keep, self.recording, self.ablator, self.state,
                              self.abl, cache, self.readout)  # fmt: skip

    def hooks(self) -> list[tuple[str, Any]]:
        return [
            (g.hook_name, (lambda gi: lambda x, h: self.hook(gi, x))(i))
            for i, g in enumerate(self.unit_map.groups)
        ]

    def new_problems(self) -> None:
        """The next passes score other problems: forget the per-problem mean replacements."""
        self.cache = {}
        self.state = None

    def record(self, tok: Tensor, ln: Tensor) -> dict[str, Tensor]:
        self.recording = {}
        try:
            padded.padded_pass(self.model, tok, ln, self.pad_state)
            return self.recording
        finally:
            self.recording = None

    def select(self, k0: int, k1: int) -> None:
        """Serve masks ``k0:k1`` in the next forward pass."""
        self.keep = self.keep_all[k0:k1]
        self.abl = None if self.abl_all is None else {h: v[k0:k1] for h, v in self.abl_all.items()}

    def scores(self, tok: Tensor, lens: Tensor, k0: int, k1: int) -> Tensor:
        """OOO logits of problems ``tok`` ``[p, 4, w]`` under masks ``k0:k1``: ``[m * p, 4]``.
        Mean ablation's state (readout positions) depends only on the problems: it is begun
        once per problems (:meth:`new_problems`); resample ablation draws its sources and
        records them in every pass, as it always has."""
        m = k1 - k0
        self.select(k0, k1)
        if self.ablator is not None and (self.state is None or self.ablator.kind != "mean"):
            flat_tok, flat_len = tok.reshape(-1, tok.shape[-1]), lens.reshape(-1)
            self.state = self.ablator.begin(flat_tok, flat_len, m, True, self.record)
        kind = None if self.ablator is None else self.ablator.kind
        self.readout = padded.readout_hook_names(self.model, self.pool, kind)
        try:
            tok_m, lens_m = tok.repeat(m, 1, 1), lens.repeat(m, 1)
            return padded.ooo_scores_padded(
                self.model, tok_m, lens_m, self.pool, self.pad_state, self.readout is not None
            )
        finally:
            self.readout = None  # the resample ablator's recording pass runs every position


@torch.no_grad()
def evaluate_fixed_masks(
    model: nn.Module, data: Any, masks: FixedMasks, pool: str | None = None, **kwargs: Any
) -> Float[Tensor, " k"]:
    """OOO accuracy of each of K fixed unit masks on ``data`` (EncodedProblems): ``[K]``.

    Keyword arguments as :func:`fixed_mask_scores`.
    """
    scores = fixed_mask_scores(model, data, masks, pool, **kwargs)
    return (scores.argmax(-1) == data.odd.cpu()[None, :]).double().mean(1)


# ---------------------------------------------------------------------------- random controls
def matched_random_masks(
    unit_map: UnitMap,
    keep: Bool[Tensor, " n_units"],
    n_draws: int,
    seed: int,
) -> Bool[Tensor, "n_draws n_units"]:
    """Random subnetworks keeping as many units per (layer, kind) as ``keep`` does.

    Within every (layer, kind), each draw keeps a uniformly random subset of the same size
    (units of groups sharing a layer and kind are pooled). Draws come from one generator seeded
    with ``seed``, in one vectorised call per (layer, kind).
    """
    keep = torch.as_tensor(keep)
    if keep.dim() != 1 or keep.numel() != unit_map.n_units:
        raise ValueError(
            f"keep has shape {tuple(keep.shape)}, expected [{unit_map.n_units}] for this unit map"
        )
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    keep = keep.bool().cpu()
    g = torch.Generator().manual_seed(int(seed))
    pools: dict[tuple[int, str], list[int]] = {}
    for off, grp in zip(unit_map.offsets(), unit_map.groups):
        pools.setdefault((grp.layer, grp.kind), []).extend(range(off, off + grp.size))
    out = torch.zeros(n_draws, unit_map.n_units, dtype=torch.bool)
    for idx in pools.values():
        idx_t = torch.tensor(idx)
        n_keep = int(keep[idx_t].sum())
        if n_keep == 0:
            continue
        order = torch.rand(n_draws, len(idx), generator=g).argsort(dim=1)[:, :n_keep]
        rows = torch.arange(n_draws)[:, None].expand_as(order)
        out[rows, idx_t[order]] = True
    return out


def n_distinct(masks: Bool[Tensor, "k n"]) -> int:
    """Number of distinct rows (e.g. distinct random draws)."""
    return int(torch.unique(torch.as_tensor(masks).bool(), dim=0).shape[0])
