"""TransformerLens 3.9 / 4.x compatibility: one set of plain functions for both versions.

TransformerLens 4 removed ``HookedTransformer``, ``HookedEncoder``, ``HookedTransformerConfig``
and ``transformer_lens.utils``; its models are ``TransformerBridge`` objects, either built from a
config (``TransformerBridge.boot_native``) or wrapping a Hugging Face model
(``TransformerBridge.boot_transformers``). The hook names this library uses are the same on both
(``blocks.{l}.attn.hook_z`` ``[batch, pos, head, d_head]``, ``blocks.{l}.mlp.hook_post``
``[batch, pos, d_mlp]``), but several behaviours differ (measured on 4.3.0, see
``docs/TL4_NOTES.md``):

- edits made in a ``hook_attn_scores`` hook are discarded on bridge models, so padded keys are
  masked with ``attention_mask=`` instead;
- ``stop_at_layer=n_layers`` does not stop (the model runs to the logits);
- ``start_at_layer`` still runs blocks ``0..k-1`` and is wrong on Hugging Face BERT models (the
  residual is fed through the embedding LayerNorm), so :func:`run_from_layer` replaces the input
  of block ``k`` with a hook instead, which is exact on every bridge model;
- a BERT bridge's ``ln_final`` is the masked-LM head's LayerNorm, not a norm of the residual;
- trainable weights are ``nn.Linear`` / ``Conv1D`` parameters of the wrapped model, named after
  its own modules (see :func:`maskable_weights`).

The functions here dispatch on the model (``TransformerBridge`` or not), so they work with either
installed version; the model adapters call them. Importing this module imports neither
``transformer_lens`` nor ``transformers``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from subroutine_circuits.models.presets import POOL_ATTR, ModelSpec
from subroutine_circuits.models.versions import tl_major, tl_version  # noqa: F401 (re-export)

HEAD_HOOK = "blocks.{layer}.attn.hook_z"
NEURON_HOOK = "blocks.{layer}.mlp.hook_post"
UNIT_KINDS = ("head", "neuron")


# ----------------------------------------------------------------------------- versions


def is_bridge(model: Any) -> bool:
    """True for a TransformerLens ``TransformerBridge`` (native or Hugging Face-backed)."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def is_encoder(model: Any) -> bool:
    """True for a BERT-style encoder: 3.9 ``HookedEncoder`` or a bridge around an MLM model.

    Encoders are post-LayerNorm and have no final norm of the residual stream: their sequence
    representation is the output of the last block.
    """
    if type(model).__name__ == "HookedEncoder":
        return True
    if is_bridge(model):
        hooks = getattr(model, "hook_dict", {})
        return "mlm_head.hook_in" in hooks or "embed_ln.hook_in" in hooks
    return hasattr(model, "encoder_output") and hasattr(model, "mlm_head")


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- native models


def native_config_dict(spec: ModelSpec, vocab_size: int) -> dict[str, Any]:
    """Config fields shared by ``HookedTransformerConfig`` (3.9) and ``TransformerBridgeConfig``.

    The same dict as :meth:`ModelSpec.config_dict` (preset sizes, GELU, LayerNorm, learned
    positions, the spec's attention direction and overrides).
    """
    return spec.config_dict(vocab_size)


def make_native_model(
    spec: ModelSpec | None = None,
    vocab_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
) -> Any:
    """A randomly initialised transformer for ``spec``, on whichever TransformerLens is installed.

    Args:
        spec: the model to build (default ``ModelSpec()``).
        vocab_size: number of token ids.
        seed: weight seed; the global torch RNG is left untouched.
        device: device of the returned model.
        backend: ``"auto"`` (``HookedTransformer`` on 3.x, ``TransformerBridge.boot_native`` on
            4.x), ``"hooked"`` (3.x only) or ``"bridge"`` (``boot_native``; 3.9 has it too).

    Returns:
        The model in eval mode, with ``sc_pool`` set to ``spec.pool``. On 3.x with
        ``backend="auto"`` this is exactly :func:`presets.make_model` (same weights per seed).
        Bridge models use TransformerLens' native initialiser, so their weights differ from a
        ``HookedTransformer``'s for the same seed. The library's own preset models come from
        :func:`presets.make_model`, which on 4.x builds a ``NativeTransformer`` (the
        ``HookedTransformer`` of 3.9, same weights per seed), not a bridge.
    """
    spec = spec if spec is not None else ModelSpec()
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    if backend not in ("auto", "hooked", "bridge"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'hooked' or 'bridge'")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    major = tl_major()
    if backend == "hooked" and major >= 4:
        raise ValueError(
            "backend='hooked' needs TransformerLens 3.x (HookedTransformer was removed in 4.0); "
            "use backend='bridge' or 'auto'"
        )
    if backend == "hooked" or (backend == "auto" and major < 4):
        from subroutine_circuits.models.presets import make_model

        return make_model(spec, vocab_size=vocab_size, seed=seed, device=device)

    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    spec.validate()
    kwargs = native_config_dict(spec, vocab_size)
    try:
        cfg = TransformerBridgeConfig(**kwargs, seed=seed, device="cpu")
    except TypeError as err:
        raise ValueError(
            f"invalid TransformerBridgeConfig field(s) {sorted(kwargs)}: {err}"
        ) from err
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_native(cfg)
    if device != "cpu":
        model.to(device)
    model.eval()
    setattr(model, POOL_ATTR, spec.pool)
    return model


# ----------------------------------------------------------------------------- padding


def attention_mask_from_lengths(lengths: Int[Tensor, "n"], pos: int) -> Int[Tensor, "n pos"]:
    """Hugging Face style mask: 1 at real positions ``< length``, 0 at right padding."""
    lengths = torch.as_tensor(lengths)
    return (torch.arange(pos, device=lengths.device)[None, :] < lengths[:, None]).long()


def _check_batch(
    model: Any, tokens: Int[Tensor, "n pos"], lengths: Int[Tensor, "n"]
) -> tuple[Tensor, Tensor]:
    """Validate a right-padded batch (see ``readout.check_tokens``) and move it to the model."""
    from subroutine_circuits.models.readout import check_tokens

    tokens, lengths = check_tokens(model, tokens, lengths)
    device = model_device(model)
    return tokens.to(device), lengths.to(device)


class _Captured(Exception):
    """Raised from a hook to end a forward pass early, carrying the hooked activation."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


def final_hook_name(model: Any) -> str:
    """The hook whose output is the normalised final residual stream of a bridge model.

    ``ln_final.hook_out`` for pre-norm models (GPT-2, native); the last block's ``hook_out`` for
    post-norm encoders (BERT), whose ``ln_final`` belongs to the masked-LM head.
    """
    if is_encoder(model):
        return f"blocks.{int(model.cfg.n_layers) - 1}.hook_out"
    return "ln_final.hook_out"


def _bridge_capture(model: Any, hook_name: str, *args: Any, **kwargs: Any) -> Tensor:
    """Run a bridge forward pass and return the output of ``hook_name`` (later layers skipped).

    Hooks already on the model fire as usual; the capturing hook is added with ``model.hooks``
    and removed on exit.
    """

    def grab(act: Tensor, hook: Any) -> Tensor:
        raise _Captured(act)

    try:
        with model.hooks(fwd_hooks=[(hook_name, grab)]):
            model(*args, **kwargs)
    except _Captured as done:
        return done.value
    raise RuntimeError(f"hook {hook_name!r} did not fire during the forward pass")


def final_resid(
    model: Any, tokens: Int[Tensor, "n pos"], lengths: Int[Tensor, "n"]
) -> Float[Tensor, "n pos d_model"]:
    """The normalised final residual stream of a right-padded batch, padded keys masked.

    ``ln_final`` output for pre-norm models; the last block's output for encoders. On 3.9
    models this is ``readout._final_resid`` (padding masked by a ``hook_attn_scores`` hook); on
    bridge models padding goes in as ``attention_mask=`` and the pass stops before the unembed.
    """
    tokens, lengths = _check_batch(model, tokens, lengths)
    if not is_bridge(model):
        from subroutine_circuits.models.readout import _final_resid

        return _final_resid(model, tokens, lengths)
    mask = attention_mask_from_lengths(lengths, tokens.shape[1])
    return _bridge_capture(model, final_hook_name(model), tokens, attention_mask=mask)


def final_hidden(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    lengths: Int[Tensor, "n"],
    pool: str | None = None,
) -> Float[Tensor, "n d_model"]:
    """Sequence embeddings at the last real token (``pool="last"``) or the mean of real tokens.

    The same contract as ``readout.final_hidden`` for every model: 3.9 ``HookedTransformer`` /
    ``HookedEncoder`` and 4.x ``TransformerBridge`` (native or Hugging Face). Gradients flow.
    """
    from subroutine_circuits.models.readout import pool_positions, resolve_pool

    pool = resolve_pool(model, pool)
    resid = final_resid(model, tokens, lengths)
    lengths = torch.as_tensor(lengths).to(resid.device).long()
    return pool_positions(resid, lengths, pool)


def full_logits(
    model: Any, tokens: Int[Tensor, "n pos"], lengths: Int[Tensor, "n"]
) -> Float[Tensor, "n pos vocab"]:
    """Logits at every position with padded keys masked (any supported model)."""
    if not is_bridge(model):
        from subroutine_circuits.models.readout import full_logits as tl3_full_logits

        return tl3_full_logits(model, tokens, lengths)
    tokens, lengths = _check_batch(model, tokens, lengths)
    mask = attention_mask_from_lengths(lengths, tokens.shape[1])
    return model(tokens, attention_mask=mask)


# ----------------------------------------------------------------------------- run from a layer


def final_norm(model: Any, resid: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n pos d_model"]:
    """Apply the model's final norm to a residual stream (identity for encoders)."""
    if is_encoder(model):
        return resid
    ln = getattr(model, "ln_final", None)
    return resid if ln is None else ln(resid)


def run_from_layer(
    model: Any,
    resid: Float[Tensor, "n pos d_model"],
    layer: int,
    attention_mask: Int[Tensor, "n pos"] | None = None,
) -> Float[Tensor, "n pos d_model"]:
    """Run blocks ``layer..n_layers-1`` on ``resid`` (the input of block ``layer``).

    Returns the residual stream after the last block, before any final norm (apply
    :func:`final_norm` for the readout). Hooks already on the model fire in those blocks.

    - 3.9 ``HookedTransformer``: ``start_at_layer`` / ``stop_at_layer`` (blocks before ``layer``
      are not run).
    - bridges and ``HookedEncoder``: a hook replaces the input of block ``layer`` with ``resid``
      and the pass stops after the last block. Blocks before ``layer`` still run (on dummy
      tokens; their hooks fire but cannot affect the result), which is what 4.x's own
      ``start_at_layer`` does as well, and it is exact where that one is not (BERT).

    ``attention_mask`` (1 = real, 0 = padding) masks padded keys on bridges and encoders; for
    ``HookedTransformer`` pass unpadded inputs or mask with ``readout.padding_masked``.
    """
    n_layers = int(model.cfg.n_layers)
    if not 0 <= int(layer) < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has n_layers={n_layers}")
    if resid.ndim != 3 or resid.shape[-1] != int(model.cfg.d_model):
        raise ValueError(
            f"resid must be [n, pos, d_model={model.cfg.d_model}], got {tuple(resid.shape)}"
        )
    if not is_bridge(model) and not is_encoder(model):
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is not supported for HookedTransformer here; pass unpadded "
                "inputs or use readout.padding_masked"
            )
        return model(resid, start_at_layer=int(layer), stop_at_layer=n_layers)

    dummy = torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)
    in_name = f"blocks.{int(layer)}.hook_resid_pre"
    last = block_output_hook(model, n_layers - 1)

    def inject(act: Tensor, hook: Any) -> Tensor:
        return resid.to(act.dtype)

    with model.hooks(fwd_hooks=[(in_name, inject)]):
        if is_bridge(model):
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
            return _bridge_capture(model, last, dummy, **kwargs)
        return _encoder_capture(model, last, dummy, attention_mask)


def block_output_hook(model: Any, layer: int) -> str:
    """The hook carrying the output of block ``layer`` (the next block's input).

    ``hook_resid_post`` for ``HookedTransformer``; ``hook_out`` for bridges (for BERT that is
    after the block's second LayerNorm); ``hook_normalized_resid_post`` for 3.9's
    ``HookedEncoder``, whose ``hook_resid_post`` is taken *before* that LayerNorm.
    """
    if is_bridge(model):
        return f"blocks.{int(layer)}.hook_out"
    if is_encoder(model):
        return f"blocks.{int(layer)}.hook_normalized_resid_post"
    return f"blocks.{int(layer)}.hook_resid_post"


def _encoder_capture(
    model: Any, hook_name: str, tokens: Tensor, attention_mask: Tensor | None
) -> Tensor:
    """3.9 ``HookedEncoder``: run ``encoder_output`` and return the output of ``hook_name``."""
    from subroutine_circuits.models.readout import padding_masked

    def grab(act: Tensor, hook: Any) -> Tensor:
        raise _Captured(act)

    try:
        with model.hooks(fwd_hooks=[(hook_name, grab)]):
            if attention_mask is None:
                model.encoder_output(tokens, None, None)
            else:
                lengths = attention_mask.long().sum(-1)
                with padding_masked(model, lengths, tokens.shape[1]):
                    model.encoder_output(tokens, None, attention_mask.long())
    except _Captured as done:
        return done.value
    raise RuntimeError(f"hook {hook_name!r} did not fire during the forward pass")


def resid_pre(
    model: Any, tokens: Int[Tensor, "n pos"], layer: int, attention_mask: Tensor | None = None
) -> Float[Tensor, "n pos d_model"]:
    """The residual stream entering block ``layer`` (``blocks.{layer}.hook_resid_pre``)."""
    n_layers = int(model.cfg.n_layers)
    if not 0 <= int(layer) < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has n_layers={n_layers}")
    name = f"blocks.{int(layer)}.hook_resid_pre"
    if is_bridge(model):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return _bridge_capture(model, name, tokens, **kwargs)
    if is_encoder(model):
        return _encoder_capture(model, name, tokens, attention_mask)
    return model(tokens, stop_at_layer=int(layer))


# ----------------------------------------------------------------------------- units and weights


def unit_groups(
    model: Any, kinds: tuple[str, ...] = UNIT_KINDS, layers: list[int] | None = None
) -> list[Any]:
    """``masks.units.UnitGroup`` objects for the heads / MLP neurons of any supported model.

    Heads: ``blocks.{l}.attn.hook_z`` axis 2 (``[batch, pos, head, d_head]``, feature axis 3);
    neurons: ``blocks.{l}.mlp.hook_post`` axis 2 (``[batch, pos, d_mlp]``). Every hook is checked
    to exist on the model; attention-only models get no neuron groups.
    """
    from subroutine_circuits.masks.units import UnitGroup

    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in UNIT_KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown unit kind(s) {bad or '(none)'}; choose from {UNIT_KINDS}")
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    layer_list = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layer_list:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: the model has n_layers={n_layers}")
    hooks = model.hook_dict
    d_mlp = getattr(cfg, "d_mlp", None)
    has_mlp = not getattr(cfg, "attn_only", False) and d_mlp is not None and int(d_mlp) > 0
    groups = []
    for layer in layer_list:
        if "head" in kinds:
            name = HEAD_HOOK.format(layer=layer)
            if name not in hooks:
                raise ValueError(f"model has no hook {name!r}")
            groups.append(UnitGroup(name, 2, int(cfg.n_heads), layer, "head", (3,)))
        if "neuron" in kinds and has_mlp:
            name = NEURON_HOOK.format(layer=layer)
            if name not in hooks:
                raise ValueError(f"model has no hook {name!r}")
            groups.append(UnitGroup(name, 2, int(d_mlp), layer, "neuron"))
    return groups


@dataclass(frozen=True)
class MaskableWeight:
    """One weight matrix a weight mask may act on.

    Attributes:
        name: dotted path that ``model.get_submodule(prefix)._parameters[last]`` resolves (what
            ``masks.WeightMask`` takes as ``param_names``).
        tl_name: the TransformerLens name of the same weight (``blocks.0.attn.W_Q``, ...).
        layer: block index.
        kind: ``W_Q``, ``W_K``, ``W_V``, ``W_O``, ``W_in``, ``W_gate`` (gated MLPs) or ``W_out``.
        shape: the parameter's shape.
    """

    name: str
    tl_name: str
    layer: int
    kind: str
    shape: tuple[int, ...]


# bridge submodule (relative to blocks.{l}) -> TransformerLens weight kind
_BRIDGE_WEIGHTS: tuple[tuple[str, str], ...] = (
    ("attn.q", "W_Q"),
    ("attn.k", "W_K"),
    ("attn.v", "W_V"),
    ("attn.o", "W_O"),
    ("mlp.in", "W_in"),
    ("mlp.gate", "W_gate"),
    ("mlp.out", "W_out"),
)


def _registered_name(model: Any, module: Any) -> str:
    """The dotted name under which ``module`` is registered in ``model``'s module tree."""
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise ValueError(f"module {type(module).__name__} is not part of the model")


def maskable_weights(model: Any) -> list[MaskableWeight]:
    """The attention and MLP weight matrices of a model, in block order (biases excluded).

    3.9 models: their own ``blocks.{l}.attn.W_Q`` ... parameters. Bridge models: the ``weight``
    of the wrapped ``nn.Linear`` / ``Conv1D`` behind ``blocks.{l}.attn.{q,k,v,o}`` and
    ``blocks.{l}.mlp.{in,gate,out}`` (GPT-2's fused ``c_attn`` is split by the bridge into q/k/v
    views; the fused copy is not used by the forward pass and is not listed). Layouts are those of
    the wrapped module (``nn.Linear``: ``[out, in]``; GPT-2 ``Conv1D``: ``[in, out]``).
    """
    out: list[MaskableWeight] = []
    n_layers = int(model.cfg.n_layers)
    if not is_bridge(model):
        params = dict(model.named_parameters())
        for layer in range(n_layers):
            for sub, kind in (("attn", "W_Q"), ("attn", "W_K"), ("attn", "W_V"), ("attn", "W_O")):
                name = f"blocks.{layer}.{sub}.{kind}"
                if name in params:
                    out.append(MaskableWeight(name, name, layer, kind, tuple(params[name].shape)))
            for kind in ("W_in", "W_gate", "W_out"):
                name = f"blocks.{layer}.mlp.{kind}"
                if name in params:
                    out.append(MaskableWeight(name, name, layer, kind, tuple(params[name].shape)))
        return out
    for layer in range(n_layers):
        for sub, kind in _BRIDGE_WEIGHTS:
            try:
                bridge_mod = model.get_submodule(f"blocks.{layer}.{sub}")
            except AttributeError:
                continue
            inner = getattr(bridge_mod, "original_component", None)
            weight = None if inner is None else inner._parameters.get("weight")
            if weight is None:
                continue
            name = _registered_name(model, inner) + ".weight"
            tl_name = f"blocks.{layer}.{sub.split('.')[0]}.{kind}"
            out.append(MaskableWeight(name, tl_name, layer, kind, tuple(weight.shape)))
    if not out:
        raise ValueError(f"no maskable attention/MLP weights found on {type(model).__name__}")
    return out


def key_padding(lengths: Int[Tensor, "n"], pos: int) -> Bool[Tensor, "n pos"]:
    """``True`` at padded positions (index >= length)."""
    return attention_mask_from_lengths(lengths, pos) == 0
