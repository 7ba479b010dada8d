"""Weight masks: ``W' = m*W + (1-m)*W_ablate`` over chosen parameters, without replacing modules.

Inside ``with wmask.applied(model):`` every masked ``module._parameters[name]`` is swapped for the
plain tensor ``m * W.detach() (+ (1-m) * W_reinit)``; the original ``nn.Parameter`` objects are
put back on exit. Because ``W`` is detached, gradients reach the mask parameters only. The masked
tensors are recomputed before every forward call of the model (a forward pre-hook on the root
module), so a training loop may run many steps inside one ``with`` block, each with a fresh
hard-concrete sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from jaxtyping import Bool, Float
from torch import Tensor

from ._base import MaskBase, hybridmethod, layer_of
from .ablation import mix
from .parametrization import Ablation, MaskConfig

_EMBEDDING_NAMES = ("W_E", "W_pos", "W_U", "W_token_type")


def check_maskable(name: str, param: Tensor, module: nn.Module | None = None) -> None:
    """Raise ValueError if ``name`` is a bias, embedding or normalisation parameter."""
    parts = name.split(".")
    last = parts[-1]
    if last in ("bias", "b") or last.startswith("b_"):
        raise ValueError(f"parameter {name!r} is a bias; weight masks never mask biases")
    if last in _EMBEDDING_NAMES or any("embed" in p.lower() for p in parts):
        raise ValueError(f"parameter {name!r} is an embedding; weight masks never mask embeddings")
    is_norm = module is not None and "norm" in type(module).__name__.lower()
    if is_norm or any(p.startswith("ln") for p in parts[:-1]):
        raise ValueError(f"parameter {name!r} belongs to a LayerNorm; weight masks never mask it")
    if param.dim() < 2:
        raise ValueError(
            f"parameter {name!r} is 1-D (bias/norm-like); weight masks need a matrix or kernel"
        )


def _split_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``("blocks.0.attn.W_Q")`` -> (the attn module, "W_Q")."""
    prefix, _, pname = name.rpartition(".")
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        raise ValueError(f"unknown parameter {name!r}: no submodule {prefix!r}") from None
    if pname not in module._parameters:
        raise ValueError(f"unknown parameter {name!r}: the model has no such parameter")
    return module, pname


class WeightMask(MaskBase):
    """A mask over individual weights of chosen parameter tensors.

    Args:
        model: the model whose parameters are masked, or a mapping ``{name: shape}`` (used when
            loading without a model).
        cfg: the mask configuration (``cfg.ablation`` is ``"zero"`` or ``"reinit"``).
        param_names: parameters to mask (required with a model: the model adapter knows its
            family's maskable weights, ``adapter.weight_names()``). Biases, embeddings and
            LayerNorm parameters are rejected with ValueError.
        reinit: for ``ablation="reinit"``: ``{name: tensor}`` of replacement values; if None they
            are drawn ``N(0, init_std)`` with a generator seeded by ``cfg.seed`` (parameters in
            order).
        fixed: a flat boolean vector making this a constant mask (see :meth:`fixed`).
        generator: source of hard-concrete samples (default: seeded with ``cfg.seed``).
        init_std: std of reinit values (``adapter.init_std()``).
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, Sequence[int]],
        cfg: MaskConfig | None = None,
        param_names: Sequence[str] | None = None,
        reinit: Mapping[str, Tensor] | None = None,
        *,
        fixed: Bool[Tensor, "n"] | None = None,
        generator: torch.Generator | None = None,
        init_std: float | None = None,
    ):
        super().__init__()
        self.cfg = cfg if cfg is not None else MaskConfig()
        self.ablation = Ablation.parse(self.cfg.ablation)
        if self.ablation not in (Ablation.ZERO, Ablation.REINIT):
            raise ValueError(
                f"weight masks support ablation 'zero' or 'reinit', got {self.ablation.value!r}"
            )
        self.init_std = None if init_std is None else float(init_std)
        if isinstance(model, nn.Module):
            if param_names is None:
                raise ValueError(
                    "WeightMask: give param_names (the model adapter's weight_names())"
                )
            names = list(param_names)
            if not names:
                raise ValueError("WeightMask: no parameters to mask (param_names is empty)")
            params = dict(model.named_parameters())
            shapes = []
            for n in names:
                module, pname = _split_name(model, n)
                p = params.get(n, module._parameters[pname])
                check_maskable(n, p, module)
                shapes.append(tuple(p.shape))
        else:
            names = list(param_names) if param_names is not None else list(model)
            shapes = [tuple(int(s) for s in model[n]) for n in names]
        if len(set(names)) != len(names):
            raise ValueError("WeightMask: duplicate parameter names")
        self.param_names = names
        self.labels = [f"weight mask of {n!r}" for n in names]
        self.layers = [layer_of(n) for n in names]
        self.kinds = [n.split(".")[-1] for n in names]
        self._build_parts(shapes, self.cfg, fixed, generator)
        self.reinit_values: dict[str, Tensor] | None = None
        if self.ablation == Ablation.REINIT:
            self.reinit_values = self._make_reinit(reinit, self.cfg.seed)
        self.meta: dict = {}

    def _make_reinit(self, reinit: Mapping[str, Tensor] | None, seed: int) -> dict[str, Tensor]:
        """Replacement values for reinit ablation (given, or drawn from N(0, init std))."""
        if reinit is not None:
            out = {}
            for n, sh in zip(self.param_names, self.shapes):
                if n not in reinit:
                    raise ValueError(f"reinit values missing for parameter {n!r}")
                t = torch.as_tensor(reinit[n]).detach().clone()
                if tuple(t.shape) != sh:
                    raise ValueError(
                        f"reinit value for {n!r} has shape {tuple(t.shape)}, expected {sh}"
                    )
                out[n] = t
            return out
        std = self.init_std
        if std is None or std <= 0:
            raise ValueError(
                "reinit ablation needs reinit values or init_std > 0 (adapter.init_std())"
            )
        g = torch.Generator().manual_seed(int(seed) + 7919)
        return {
            n: torch.randn(sh, generator=g) * float(std)
            for n, sh in zip(self.param_names, self.shapes)
        }

    # ------------------------------------------------------------------ constructors
    @classmethod
    def fixed(
        cls,
        model: nn.Module | Mapping[str, Sequence[int]],
        flat_bool: Bool[Tensor, "n"],
        param_names: Sequence[str] | None = None,
        ablation: str | Ablation = "zero",
        reinit: Mapping[str, Tensor] | None = None,
        seed: int = 0,
        init_std: float | None = None,
    ) -> WeightMask:
        """A non-trainable weight mask keeping the weights where ``flat_bool`` is True."""
        cfg = MaskConfig(ablation=Ablation.parse(ablation).value, seed=seed)
        return cls(model, cfg, param_names, reinit, fixed=flat_bool, init_std=init_std)

    def _fixed_copy(self, flat_bool: Bool[Tensor, "n"]) -> WeightMask:
        """A fixed mask over the same parameters with the same ablation (values copied)."""
        shapes = dict(zip(self.param_names, self.shapes))
        out = WeightMask(
            shapes,
            MaskConfig(ablation=self.ablation.value, seed=self.cfg.seed),
            self.param_names,
            self.reinit_values,
            fixed=flat_bool,
            init_std=self.init_std,
        )
        return out

    def fixed_like(
        self,
        flat_bool: Bool[Tensor, "n"],
        ablation: str | Ablation | None = None,
        seed: int | None = None,
    ) -> WeightMask:
        """A fixed mask over the same parameters.

        ``ablation`` defaults to this mask's. For ``"reinit"`` the replacement values are this
        mask's own when it has them and ``seed`` is None or equal to ``cfg.seed``; otherwise
        they are drawn ``N(0, init_std)`` with ``seed``.
        """
        abl = self.ablation if ablation is None else Ablation.parse(ablation)
        seed = self.cfg.seed if seed is None else int(seed)
        reinit = None
        if abl == Ablation.REINIT:
            if self.reinit_values is not None and seed == self.cfg.seed:
                reinit = self.reinit_values
            else:
                reinit = self._make_reinit(None, seed)
        return WeightMask(
            dict(zip(self.param_names, self.shapes)),
            MaskConfig(ablation=abl.value, seed=seed),
            self.param_names,
            reinit,
            fixed=flat_bool,
            init_std=self.init_std,
        )

    def complement(self) -> WeightMask:
        """Fixed mask keeping exactly the weights this mask removes."""
        return self._fixed_copy(~self.flat_binary())

    @hybridmethod
    def random_like(mask: WeightMask, seed: int, per_param: bool = False) -> WeightMask:
        """Fixed random mask with the same number of kept weights as ``mask``.

        Call as ``WeightMask.random_like(mask, seed)`` or ``mask.random_like(seed)``.

        ``per_param=False`` (default): same total count, uniformly over all masked weights;
        ``per_param=True``: the count is matched within every parameter tensor.
        """
        return mask._fixed_copy(mask._random_flat(seed, per_param))

    # ------------------------------------------------------------------ queries
    def binary(self) -> dict[str, Bool[Tensor, "..."]]:
        """Deterministic binary mask per parameter name."""
        return {n: p.binary() for n, p in zip(self.param_names, self.parts)}

    def shapes_dict(self) -> dict[str, list[int]]:
        """``{param_name: shape}`` of the masked parameters."""
        return {n: list(sh) for n, sh in zip(self.param_names, self.shapes)}

    # ------------------------------------------------------------------ application
    def masked_weight(self, idx: int, weight: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """``m * W`` (zero) or ``m*W + (1-m)*W_reinit`` for part ``idx`` (W detached), through
        the one ablation formula :func:`~subroutine_circuits.masks.ablation.mix`."""
        part = self.parts[idx]
        part.check_finite(self.labels[idx])
        w = weight.detach()
        m = part().to(device=w.device, dtype=w.dtype)
        if self.ablation == Ablation.ZERO:
            return mix(w, m)
        r = self.reinit_values[self.param_names[idx]].to(device=w.device, dtype=w.dtype)
        return mix(w, m, r)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[WeightMask]:
        """Context manager: masked weights in place inside the block, originals restored after."""
        targets = []
        for n, sh in zip(self.param_names, self.shapes):
            module, pname = _split_name(model, n)
            orig = module._parameters[pname]
            if tuple(orig.shape) != sh:
                raise ValueError(
                    f"parameter {n!r} has shape {tuple(orig.shape)} on this model, the mask "
                    f"expects {sh}"
                )
            targets.append((module, pname, orig))
        self.check_finite()

        def refresh() -> None:
            for i, (module, pname, orig) in enumerate(targets):
                module._parameters[pname] = self.masked_weight(i, orig)

        handle = model.register_forward_pre_hook(lambda module, args: refresh())
        try:
            refresh()
            yield self
        finally:
            handle.remove()
            for module, pname, orig in targets:
                module._parameters[pname] = orig
