"""Mask parametrisations behind one interface, plus the mask configuration.

Every parametrisation is an ``nn.Module`` that owns the mask parameters of one tensor shape and
produces a mask of that shape:

- ``forward()``: in ``train()`` mode a soft / stochastic mask in [0, 1] (differentiable w.r.t.
  the parameters); in ``eval()`` mode the deterministic binary mask as a float tensor.
- ``binary()``: the deterministic binary mask (BoolTensor), independent of the mode.
- ``penalty()``: the differentiable sparsity penalty (a scalar).
- ``expected_l0()``: the expected number of kept entries (a float tensor, no grad needed).

Implemented: :class:`ContinuousSparsification` (Savarese et al. 2020, as used by Lepori et al.
2023), :class:`HardConcrete` (Louizos et al. 2018, L0 regularisation) and :class:`FixedMask`
(a constant boolean mask, no parameters).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Bool, Float
from torch import Tensor

PARAMETRIZATIONS = ("hard_concrete", "continuous")


class Ablation(str, Enum):
    """What a masked-out unit / weight is replaced with.

    ``ZERO``: zero. ``MEAN``: the mean activation over a reference batch (unit masks).
    ``RESAMPLE``: the activation recorded on a corrupted input (unit masks).
    ``REINIT``: the value of a freshly initialised copy of the weight (weight masks).
    """

    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"
    REINIT = "reinit"

    @classmethod
    def parse(cls, value: str | Ablation) -> Ablation:
        """Convert a string (case-insensitive) or an Ablation to an Ablation."""
        if isinstance(value, Ablation):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown ablation {value!r}; choose one of {[a.value for a in cls]}"
            ) from None


@dataclass
class MaskConfig:
    """Configuration of a trainable mask.

    Attributes:
        parametrization: ``"hard_concrete"`` (L0, Louizos et al.) or ``"continuous"``
            (continuous sparsification, mask = sigmoid(T*s)).
        init: initial value of every mask logit: ``s`` for continuous (positive = kept),
            ``log_alpha`` for hard concrete. ``None`` picks a default that starts every unit kept:
            1.0 (continuous) and 2.0 (hard concrete; eval mask ``0.88*1.2-0.1 = 0.96 > 0.5``).
        temp_growth: continuous only: the temperature T starts at 1 and is multiplied by this
            factor on each ``step_temperature()`` call (e.g. ``200 ** (1 / epochs)``).
            Default ``200 ** (1 / 100)``: T reaches 200 after 100 calls.
        ablation: ``"zero"``, ``"mean"``, ``"resample"`` (unit masks) or ``"zero"``, ``"reinit"``
            (weight masks).
        seed: seed of the mask's own ``torch.Generator`` (hard-concrete sampling, reinit values).
        beta, gamma, zeta: hard-concrete temperature and stretch interval.
    """

    parametrization: str = "hard_concrete"
    init: float | None = None
    temp_growth: float = 200.0 ** (1.0 / 100.0)
    ablation: str = "zero"
    seed: int = 0
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1

    def __post_init__(self) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"unknown parametrization {self.parametrization!r}; choose one of "
                f"{list(PARAMETRIZATIONS)}"
            )
        if self.init is not None and not math.isfinite(float(self.init)):
            raise ValueError(f"MaskConfig.init must be finite, got {self.init}")
        if not (float(self.temp_growth) > 0 and math.isfinite(float(self.temp_growth))):
            raise ValueError(
                f"MaskConfig.temp_growth must be a positive number, got {self.temp_growth}"
            )
        if not self.beta > 0:
            raise ValueError(f"MaskConfig.beta must be positive, got {self.beta}")
        if not (self.gamma < 0 < 1 < self.zeta):
            raise ValueError(
                f"MaskConfig needs gamma < 0 and zeta > 1, got gamma={self.gamma}, zeta={self.zeta}"
            )
        self.ablation = Ablation.parse(self.ablation).value

    @property
    def init_value(self) -> float:
        """The initial logit actually used (resolves ``init=None``)."""
        if self.init is not None:
            return float(self.init)
        return 1.0 if self.parametrization == "continuous" else 2.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ValueError)."""
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown MaskConfig fields: {sorted(extra)}")
        return cls(**d)


class Parametrization(nn.Module):
    """Base class: a mask of a fixed ``shape``; subclasses implement the four methods."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self) -> Float[Tensor, "..."]:  # noqa: D401
        """Soft mask in training, binary float mask in eval."""
        raise NotImplementedError

    def binary(self) -> Bool[Tensor, "..."]:
        """Deterministic binary mask."""
        raise NotImplementedError

    def penalty(self) -> Float[Tensor, ""]:
        """Differentiable sparsity penalty."""
        return torch.zeros(())

    def soft_count(self) -> Float[Tensor, ""]:
        """A differentiable count of the entries the *binary* mask keeps (what a target
        density constrains): the penalty, unless the parametrisation says otherwise."""
        return self.penalty()

    def drop(self, off: Bool[Tensor, "..."]) -> None:
        """Turn the entries where ``off`` is True off in the binary mask (in place), leaving the
        others' binary value unchanged (e.g. a minimality pass removing unneeded units)."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop entries")

    def expected_l0(self) -> Float[Tensor, ""]:
        """Expected number of kept entries."""
        return self.binary().sum().float()

    def check_finite(self, label: str) -> None:
        """Raise ValueError naming ``label`` if a mask parameter is NaN or infinite."""
        for pname, p in self.named_parameters():
            if not torch.isfinite(p).all():
                n_bad = int((~torch.isfinite(p)).sum())
                raise ValueError(
                    f"mask parameter {pname!r} of {label} has {n_bad} NaN/inf values "
                    "(diverged training step?)"
                )


class ContinuousSparsification(Parametrization):
    """Continuous sparsification: ``mask = sigmoid(T * s)`` in training, ``s > 0`` at eval.

    The penalty is ``sum(sigmoid(T * s))`` (a soft count of kept entries, as in Lepori et al.);
    ``expected_l0`` is the same quantity. ``T`` starts at 1 and is multiplied by ``temp_growth``
    on each :meth:`step_temperature` call.
    """

    def __init__(self, shape: tuple[int, ...], init: float = 1.0, temp_growth: float = 1.0):
        super().__init__(shape)
        self.logits = nn.Parameter(torch.full(self.shape, float(init)))
        self.temp_growth = float(temp_growth)
        self.register_buffer("temperature", torch.ones(()))

    def step_temperature(self) -> float:
        """Multiply the temperature by ``temp_growth``; return the new temperature."""
        self.temperature.mul_(self.temp_growth)
        return float(self.temperature)

    def soft(self) -> Float[Tensor, "..."]:
        """``sigmoid(T * s)``."""
        return torch.sigmoid(self.temperature * self.logits)

    def forward(self) -> Float[Tensor, "..."]:
        """Soft mask in training, ``(s > 0).float()`` at eval."""
        if self.training:
            return self.soft()
        return self.binary().to(self.logits.dtype)

    def binary(self) -> Bool[Tensor, "..."]:
        """``s > 0``."""
        return self.logits.detach() > 0

    @torch.no_grad()
    def drop(self, off: Bool[Tensor, "..."]) -> None:
        """Set the dropped entries' scores just below the threshold 0 (their ranking among the
        other removed entries is lost, their order above never-kept ones too: a dropped entry
        gets score ``min(s, 0) - 1e-3``)."""
        off = off.to(self.logits.device)
        self.logits[off] = torch.clamp(self.logits[off], max=0.0) - 1e-3

    def penalty(self) -> Float[Tensor, ""]:
        """``sum(sigmoid(T * s))``."""
        return self.soft().sum()

    def expected_l0(self) -> Float[Tensor, ""]:
        """``sum(sigmoid(T * s))`` (detached)."""
        return self.soft().detach().sum()


class HardConcrete(Parametrization):
    """Hard-concrete gates (Louizos, Welling & Kingma 2018).

    Training: ``u ~ U(0,1)`` (from the given ``torch.Generator``),
    ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
    mask ``= clamp(s*(zeta-gamma)+gamma, 0, 1)``.
    Penalty (expected L0): ``sum(sigmoid(log_alpha - beta * log(-gamma / zeta)))``.
    Eval: ``clamp(sigmoid(log_alpha)*(zeta-gamma)+gamma, 0, 1) > 0.5`` as a binary mask.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        init: float = 2.0,
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
        generator: torch.Generator | None = None,
    ):
        super().__init__(shape)
        self.log_alpha = nn.Parameter(torch.full(self.shape, float(init)))
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def sample(self) -> Float[Tensor, "..."]:
        """A stochastic stretched-and-clamped sample (differentiable w.r.t. ``log_alpha``)."""
        eps = 1e-6
        u = torch.rand(self.shape, generator=self.generator).clamp(eps, 1 - eps)
        u = u.to(self.log_alpha.device, self.log_alpha.dtype)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> Float[Tensor, "..."]:
        """``clamp(sigmoid(log_alpha)*(zeta-gamma)+gamma, 0, 1)`` (before thresholding)."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def forward(self) -> Float[Tensor, "..."]:
        """Stochastic sample in training, binary float mask at eval."""
        if self.training:
            return self.sample()
        return self.binary().to(self.log_alpha.dtype)

    def binary(self) -> Bool[Tensor, "..."]:
        """``deterministic() > 0.5``."""
        return self.deterministic().detach() > 0.5

    @torch.no_grad()
    def drop(self, off: Bool[Tensor, "..."]) -> None:
        """Set the dropped entries' ``log_alpha`` just below the value where ``binary`` turns
        False (``logit((0.5 - gamma) / (zeta - gamma))``), so they stay ranked above entries
        that were never kept only if those were lower already."""
        off = off.to(self.log_alpha.device)
        q = (0.5 - self.gamma) / (self.zeta - self.gamma)
        edge = math.log(q / (1.0 - q)) - 1e-3
        self.log_alpha[off] = torch.clamp(self.log_alpha[off], max=edge)

    def soft_count(self) -> Float[Tensor, ""]:
        """``sum(sigmoid(log_alpha))``: each entry's share is above 1/2 exactly when the binary
        mask keeps it (``log_alpha > 0``), unlike the expected L0, whose stretch counts an entry
        at ``log_alpha = -1.6`` as half kept."""
        return torch.sigmoid(self.log_alpha).sum()

    def probs_nonzero(self) -> Float[Tensor, "..."]:
        """``P(gate != 0) = sigmoid(log_alpha - beta*log(-gamma/zeta))`` per entry."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def penalty(self) -> Float[Tensor, ""]:
        """Expected L0: sum of ``P(gate != 0)``."""
        return self.probs_nonzero().sum()

    def expected_l0(self) -> Float[Tensor, ""]:
        """Expected L0 (detached)."""
        return self.probs_nonzero().detach().sum()


class FixedMask(Parametrization):
    """A constant boolean mask (no trainable parameters); the same in train and eval."""

    def __init__(self, values: Bool[Tensor, "..."]):
        values = torch.as_tensor(values).bool()
        super().__init__(tuple(values.shape))
        self.register_buffer("values", values.clone())

    def forward(self) -> Float[Tensor, "..."]:
        """The mask as floats."""
        return self.values.float()

    def binary(self) -> Bool[Tensor, "..."]:
        """The mask."""
        return self.values.clone()

    def drop(self, off: Bool[Tensor, "..."]) -> None:
        """Set the dropped entries to False."""
        self.values[off.to(self.values.device)] = False

    def expected_l0(self) -> Float[Tensor, ""]:
        """Number of kept entries."""
        return self.values.sum().float()


def make_parametrization(
    shape: tuple[int, ...], cfg: MaskConfig, generator: torch.Generator
) -> Parametrization:
    """Build the parametrisation named by ``cfg.parametrization`` for a tensor of ``shape``."""
    if cfg.parametrization == "continuous":
        return ContinuousSparsification(shape, cfg.init_value, cfg.temp_growth)
    if cfg.parametrization == "hard_concrete":
        return HardConcrete(shape, cfg.init_value, cfg.beta, cfg.gamma, cfg.zeta, generator)
    raise ValueError(f"unknown parametrization {cfg.parametrization!r}")
