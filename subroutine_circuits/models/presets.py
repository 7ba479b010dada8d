"""Transformer presets: build seeded ``HookedTransformer`` models from a small ``ModelSpec``
(TransformerLens 3.9's class, or this library's ``NativeTransformer`` on TransformerLens 4).

Presets (all use LayerNorm, GELU MLPs and learned positional embeddings):

=======  ========  =======  =======  ======  =====
preset   n_layers  d_model  n_heads  d_head  d_mlp
=======  ========  =======  =======  ======  =====
tiny     2         64       4        16      256
small    4         256      8        32      1024
base     4         512      8        64      2048
=======  ========  =======  =======  ======  =====

``base`` is about the size of BERT-small. ``ModelSpec.attention`` chooses a causal (GPT-style)
or bidirectional (BERT-style) attention pattern; ``pool`` chooses how a sequence embedding is
read out (``"last"`` real token or ``"mean"`` over real tokens, see ``readout.final_hidden``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_head": 16, "d_mlp": 256},
    "small": {"n_layers": 4, "d_model": 256, "n_heads": 8, "d_head": 32, "d_mlp": 1024},
    "base": {"n_layers": 4, "d_model": 512, "n_heads": 8, "d_head": 64, "d_mlp": 2048},
}
ATTENTION_KINDS = ("causal", "bidirectional")
POOLS = ("last", "mean")

# Attribute set on models built by make_model / load_checkpoint so that readouts can default
# to the pooling the model was trained with.
POOL_ATTR = "sc_pool"


@dataclass(init=False)
class ModelSpec:
    """Which transformer to build.

    Args:
        preset: ``"tiny"``, ``"small"`` or ``"base"`` (see the module docstring).
        attention: ``"causal"`` or ``"bidirectional"``.
        n_ctx: maximum sequence length (positional embeddings).
        pool: sequence readout, ``"last"`` (last real token) or ``"mean"`` (mean over real tokens).
        overrides: ``HookedTransformerConfig`` fields that replace the preset's values
            (e.g. ``{"n_layers": 3}``). Extra keyword arguments are merged into ``overrides``,
            so ``ModelSpec("tiny", d_mlp=128)`` works too.
    """

    preset: str = "tiny"
    attention: str = "causal"
    n_ctx: int = 64
    pool: str = "last"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        preset: str = "tiny",
        attention: str = "causal",
        n_ctx: int = 64,
        pool: str = "last",
        overrides: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        self.preset = preset
        self.attention = attention
        self.n_ctx = n_ctx
        self.pool = pool
        self.overrides = {**(overrides or {}), **extra}
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"unknown attention {self.attention!r}; choose one of {list(ATTENTION_KINDS)}"
            )
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {list(POOLS)}")
        if not isinstance(self.n_ctx, int) or self.n_ctx < 2:
            raise ValueError(f"n_ctx must be an int >= 2, got {self.n_ctx!r}")
        forbidden = {"d_vocab", "attention_dir", "seed", "device"} & set(self.overrides)
        if forbidden:
            raise ValueError(
                f"overrides may not set {sorted(forbidden)}: use make_model's vocab_size, "
                "ModelSpec.attention, seed and device arguments"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (round-trips through ``from_dict``)."""
        return {
            "preset": self.preset,
            "attention": self.attention,
            "n_ctx": self.n_ctx,
            "pool": self.pool,
            "overrides": dict(self.overrides),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Inverse of ``to_dict``."""
        return cls(**d)

    def config_dict(self, vocab_size: int) -> dict[str, Any]:
        """The ``HookedTransformerConfig`` keyword arguments for this spec (without seed/device)."""
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        cfg: dict[str, Any] = dict(PRESETS[self.preset])
        cfg.update(
            d_vocab=vocab_size,
            n_ctx=self.n_ctx,
            act_fn="gelu",
            normalization_type="LN",
            attention_dir=self.attention,
        )
        cfg.update(self.overrides)
        if "d_model" in self.overrides or "n_heads" in self.overrides:
            if "d_head" not in self.overrides:
                if cfg["d_model"] % cfg["n_heads"]:
                    raise ValueError(
                        f"d_model {cfg['d_model']} is not divisible by n_heads {cfg['n_heads']}"
                    )
                cfg["d_head"] = cfg["d_model"] // cfg["n_heads"]
        return cfg


BACKENDS = ("auto", "tl", "native")


def make_model(
    spec: ModelSpec | None = None,
    vocab_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
) -> HookedTransformer:
    """Build a randomly initialised preset transformer for ``spec``; deterministic per seed.

    ``backend`` chooses the class: ``"tl"`` is TransformerLens 3.9's ``HookedTransformer``
    (needs ``transformer-lens<4``), ``"native"`` this library's
    :class:`~subroutine_circuits.models.native.NativeTransformer` (same parameters, hooks and
    initial weights; runs on 3.9 and 4.x), ``"auto"`` the first on TransformerLens 3.x and the
    second on 4.x. The weights are drawn on the CPU from a private ``torch`` RNG state seeded with
    ``seed`` (the global RNG is left untouched), then moved to ``device``; the same seed therefore
    gives identical weights on every device and with either backend. The model is returned in
    eval mode with ``model.sc_pool = spec.pool`` so that readouts default to the spec's pooling.
    """
    import torch

    spec = spec if spec is not None else ModelSpec()
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    spec.validate()
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    kwargs = spec.config_dict(vocab_size)
    if backend == "auto":
        from subroutine_circuits.models.versions import tl_major

        backend = "tl" if tl_major() < 4 else "native"
    if backend == "tl":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model_cls, cfg_cls = HookedTransformer, HookedTransformerConfig
    else:
        from subroutine_circuits.models.native import NativeConfig, NativeTransformer

        model_cls, cfg_cls = NativeTransformer, NativeConfig
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown HookedTransformerConfig override(s): {unknown}")
    cfg = cfg_cls(**kwargs, device="cpu")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated", category=DeprecationWarning)
        torch.manual_seed(seed)
        model = model_cls(cfg, move_to_device=False)
    model.cfg.seed = seed  # informational only (set after construction: no global reseed)
    if device != "cpu":
        model.to(device, print_details=False)
    model.eval()
    setattr(model, POOL_ATTR, spec.pool)
    return model


def hooked_transformer(backend: str = "auto", **cfg_fields: Any) -> HookedTransformer:
    """A ``HookedTransformer`` from ``HookedTransformerConfig`` fields, on either TransformerLens.

    ``backend`` as in :func:`make_model` (``"auto"``: TransformerLens' class on 3.x,
    :class:`~subroutine_circuits.models.native.NativeTransformer` on 4.x). Seeding follows the
    config's ``seed`` field, as in TransformerLens. The model is in eval mode.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        from subroutine_circuits.models.versions import tl_major

        backend = "tl" if tl_major() < 4 else "native"
    if backend == "tl":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*is deprecated", category=DeprecationWarning
            )
            model = HookedTransformer(HookedTransformerConfig(**cfg_fields))
    else:
        from subroutine_circuits.models.native import NativeConfig, NativeTransformer

        model = NativeTransformer(NativeConfig(**cfg_fields))
    return model.eval()
