"""The TransformerLens 3.9 adapter: ``HookedTransformer`` (causal or bidirectional) and
``HookedEncoder`` (BERT-style).

Units: heads of ``blocks.{l}.attn.hook_z`` (axis 2 of ``[batch, pos, head, d_head]``, the
``d_head`` axis is the head's feature vector) and neurons of ``blocks.{l}.mlp.hook_post``
(axis 2 of ``[batch, pos, d_mlp]``). Maskable weights: ``W_Q, W_K, W_V, W_O, W_in, W_out``.
Stimuli are texts, encoded by a word-level (or any ``encode_batch``) tokenizer into right-padded
``tokens`` and ``lengths``; padded keys are masked out of every attention pattern (a hook on
``hook_attn_scores``), which is the one mechanism that works for causal and bidirectional models
alike. The readout is the ``ln_final`` output at the last real token (``pool="last"``) or the
mean over real tokens (``pool="mean"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from subroutine_circuits.adapters.base import (
    Readout,
    Recorded,
    named_hooks,
    register_adapter,
)
from subroutine_circuits.adapters.text import TextModelAdapter
from subroutine_circuits.masks.ablation import readout_positions
from subroutine_circuits.masks.units import UnitGroup, UnitMap
from subroutine_circuits.utils import real_positions

#: Hook-name templates of the unit kinds.
UNIT_HOOKS = {
    "head": "blocks.{layer}.attn.hook_z",
    "neuron": "blocks.{layer}.mlp.hook_post",
}
#: Parameter-name suffixes that weight masks mask (never biases, embeddings, LayerNorms).
WEIGHT_SUFFIXES = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")
ATTN_SCORES_SUFFIX = "attn.hook_attn_scores"
MODEL_CLASSES = ("HookedTransformer", "HookedEncoder", "NativeTransformer")


def is_transformer_lens(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens 3.9 ``HookedTransformer`` / ``HookedEncoder`` or
    this library's ``NativeTransformer`` (the same interface on TransformerLens 4)."""
    return type(model).__name__ in MODEL_CLASSES and hasattr(model, "cfg")


def weight_names(model: nn.Module) -> list[str]:
    """Every parameter whose name ends in W_Q, W_K, W_V, W_O, W_in or W_out (model order)."""
    return [n for n, _ in model.named_parameters() if n.split(".")[-1] in WEIGHT_SUFFIXES]


def tl_unit_map(
    model: nn.Module,
    kinds: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
) -> UnitMap:
    """Heads and/or MLP neurons of a TransformerLens model (per layer: heads, then neurons).

    Neuron groups are skipped for attention-only models (no ``mlp.hook_post``).
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "n_layers"):
        raise ValueError(
            f"{type(model).__name__} is not a TransformerLens model (no cfg); build "
            "UnitMap([UnitGroup(...), ...]) explicitly or use HookedModuleAdapter"
        )
    kinds = ("head", "neuron") if kinds is None else tuple(kinds)
    if not kinds:
        raise ValueError("unit kinds are empty; use 'head' and/or 'neuron'")
    for k in kinds:
        if k not in UNIT_HOOKS:
            raise ValueError(f"unknown unit kind {k!r} for a transformer; use 'head' or 'neuron'")
    n_layers = int(cfg.n_layers)
    layer_list = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layer_list:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: the model has n_layers={n_layers}")
    hook_dict = getattr(model, "hook_dict", {})
    groups = []
    for layer in layer_list:
        for kind in ("head", "neuron"):
            if kind not in kinds:
                continue
            name = UNIT_HOOKS[kind].format(layer=layer)
            if name not in hook_dict:
                if kind == "neuron":  # attention-only model
                    continue
                raise ValueError(f"model has no hook {name!r}")
            if kind == "head":
                groups.append(UnitGroup(name, 2, int(cfg.n_heads), layer, "head", (3,)))
            else:
                d_mlp = getattr(cfg, "d_mlp", None)
                if d_mlp is None or int(d_mlp) <= 0:
                    continue
                groups.append(UnitGroup(name, 2, int(d_mlp), layer, "neuron"))
    return UnitMap(groups)


def check_unit_sizes(model: nn.Module, unit_map: UnitMap) -> None:
    """Raise ValueError if a head / neuron group's size differs from the model's cfg."""
    unit_map.validate(model)
    cfg = model.cfg
    for g in unit_map.groups:
        want = None
        if g.kind == "head" and hasattr(cfg, "n_heads"):
            want = int(cfg.n_heads)
        elif g.kind == "neuron" and getattr(cfg, "d_mlp", None):
            want = int(cfg.d_mlp)
        if want is not None and want != g.size:
            raise ValueError(f"unit group {g.hook_name!r} has size {g.size}, the model has {want}")


# ------------------------------------------------------------------------------ patching readouts


def logits_readout(model, resid: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n pos d_vocab"]:
    """The model's logits from its final residual stream (ln_final, unembed, soft-cap; for a
    ``HookedEncoder`` its masked-LM head and unembedding)."""
    from subroutine_circuits.models.readout import _is_encoder

    if _is_encoder(model):
        return model.unembed(model.mlm_head(resid))
    return model(resid, start_at_layer=model.cfg.n_layers)


def _final_norm(model, resid: Tensor) -> Tensor:
    ln = getattr(model, "ln_final", None)
    return resid if ln is None else ln(resid)


def hidden_last_readout(model, resid: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n d_model"]:
    """``ln_final`` output at the last position (inputs are unpadded)."""
    return _final_norm(model, resid)[:, -1]


def hidden_mean_readout(model, resid: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n d_model"]:
    """``ln_final`` output averaged over positions (inputs are unpadded)."""
    return _final_norm(model, resid).mean(dim=1)


READOUTS: dict[str, Readout] = {
    "logits": logits_readout,
    "hidden_last": hidden_last_readout,
    "hidden_mean": hidden_mean_readout,
}


class TransformerLensAdapter(TextModelAdapter):
    """Adapter for TransformerLens 3.9 ``HookedTransformer`` and ``HookedEncoder``.

    Args:
        model: the model.
        tokenizer: encodes stimulus texts (``encode_batch(texts) -> (tokens, lengths)``); needed
            by :meth:`encode_stimuli` / :meth:`encode_problems` only.
        pool: ``"last"`` / ``"mean"`` readout; None: the model's ``sc_pool`` attribute, else last.
    """

    family = "transformer_lens"
    readouts = READOUTS

    accepts = staticmethod(lambda model: is_transformer_lens(model))
    expected = "a HookedTransformer or HookedEncoder"

    @property
    def is_encoder(self) -> bool:
        """True for a BERT-style ``HookedEncoder`` (no ``start_at_layer``, no ``ln_final``)."""
        from subroutine_circuits.models.readout import _is_encoder

        return _is_encoder(self.model)

    @property
    def can_start_at_layer(self) -> bool:  # type: ignore[override]
        return not self.is_encoder

    # ------------------------------------------------------------------ identity / units
    def class_name(self) -> str:
        """The model class name saved with masks (``utils.saved_class_name``)."""
        from subroutine_circuits.utils import saved_class_name

        return saved_class_name(self.model)

    def unit_map(
        self, kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None
    ) -> UnitMap:
        """Heads and/or neurons (see :func:`tl_unit_map`)."""
        return tl_unit_map(self.model, kinds, layers)

    def check_unit_map(self, unit_map: UnitMap) -> None:
        """Raise ValueError if ``unit_map`` does not fit this model (hooks and sizes)."""
        check_unit_sizes(self.model, unit_map)

    def weight_names(self) -> list[str]:
        """Every W_Q, W_K, W_V, W_O, W_in, W_out parameter."""
        names = weight_names(self.model)
        if not names:
            raise ValueError("the model has no W_Q/W_K/W_V/W_O/W_in/W_out parameters to mask")
        return names

    def init_std(self) -> float | None:
        """``cfg.initializer_range``."""
        return getattr(self.model.cfg, "initializer_range", None)

    def reinit(self, seed: int) -> None:
        """``torch.manual_seed(seed); model.init_weights()``."""
        torch.manual_seed(seed)
        self.model.init_weights()

    # ------------------------------------------------------------------ stimuli and readout

    @staticmethod
    def _tokens(inputs: Mapping[str, Tensor] | Tensor) -> tuple[Tensor, Tensor | None]:
        if isinstance(inputs, Tensor):
            return inputs, None
        if "tokens" not in inputs:
            raise ValueError(f"inputs need 'tokens' (got {sorted(inputs)})")
        return inputs["tokens"], inputs.get("lengths")

    def _readout_mask(self, lengths: Tensor, pos: int) -> Tensor | None:
        """``[n, pos]``: True at the position the readout reads (last real token), if any."""
        if self.pool != "last":
            return None
        return torch.arange(pos, device=lengths.device)[None, :] == (lengths[:, None] - 1)

    def embed(self, inputs: Mapping[str, Tensor]) -> Float[Tensor, "n d_model"]:
        """``final_hidden`` of the stimuli (trimmed to their longest; padded keys masked)."""
        from subroutine_circuits.models.readout import final_hidden

        tokens, lengths = self._tokens(inputs)
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
        max_len = int(lengths.max())
        tokens = tokens[..., :max_len]
        with readout_positions(self._readout_mask(lengths.to(tokens.device), max_len)):
            return final_hidden(self.model, tokens, lengths, self.pool)

    def ooo_logits(self, inputs: Mapping[str, Tensor]) -> Float[Tensor, "b 4"]:
        """OOO scores of ``{"tokens": [b, 4, pos], "lengths": [b, 4]}`` (one forward pass)."""
        from subroutine_circuits.models.readout import ooo_logits

        tokens, lengths = self._tokens(inputs)
        b, k, _ = tokens.shape
        max_len = int(lengths.max())
        ro = self._readout_mask(lengths.reshape(b * k).to(tokens.device), max_len)
        with readout_positions(ro):
            return ooo_logits(self.model, tokens, lengths, self.pool)

    def label_logits(self, inputs: Mapping[str, Tensor]) -> Float[Tensor, "n vocab"]:
        """Vocabulary logits at the last real token."""
        from subroutine_circuits.models.readout import label_logits

        tokens, lengths = self._tokens(inputs)
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
        return label_logits(self.model, tokens, lengths)

    # ------------------------------------------------------------------ ablation reference
    @torch.no_grad()
    def record_activations(
        self, inputs: Mapping[str, Tensor] | Tensor, hook_names: Sequence[str]
    ) -> Recorded:
        """Run ``tokens`` (no mask) and record ``hook_names``.

        With ``lengths``, padded positions are excluded (``pos_mask``) and padded *keys* are
        masked out of attention, so bidirectional models see only real tokens. On a GPU the
        stimuli run in chunks within the worker's memory budget
        (:func:`subroutine_circuits.memory.rows_per_pass`, halved on out-of-memory errors).
        """
        from subroutine_circuits.memory import rows_per_pass, run_chunked

        tokens, lengths = self._tokens(inputs)
        pos_mask = readout = None
        if lengths is not None:
            pos_mask = real_positions(lengths, tokens.shape[1])
            readout = self._readout_mask(torch.as_tensor(lengths), tokens.shape[1])

        def record(part: range) -> dict[str, Tensor]:
            """The activations of stimuli ``part`` (one forward pass)."""
            acts: dict[str, Tensor] = {}

            def save(x: Tensor, hook) -> None:
                acts[hook.name] = x.detach()

            hooks: list = [(h, save) for h in hook_names]
            if pos_mask is not None:
                key_ok = pos_mask[part.start : part.stop]

                def mask_keys(scores: Float[Tensor, "batch head q k"], hook) -> Tensor:
                    keep = key_ok[:, None, None, : scores.shape[-1]].to(scores.device)
                    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)

                hooks += [
                    (n, mask_keys) for n in self.model.hook_dict if n.endswith("hook_attn_scores")
                ]
            self.model.run_with_hooks(tokens[part.start : part.stop], fwd_hooks=hooks)
            return acts

        n_rows = tokens.shape[0]
        rows = rows_per_pass(self.model, tokens.shape[-1], n_rows)
        parts = (
            run_chunked(record, range(n_rows), rows, label="stimuli", key="record_activations")
            if n_rows
            else [record(range(0))]
        )
        acts = (
            parts[0] if len(parts) == 1 else {h: torch.cat([p[h] for p in parts]) for h in parts[0]}
        )
        return Recorded(acts, pos_mask, readout)

    # ------------------------------------------------------------------ patching
    @property
    def n_layers(self) -> int:
        """``cfg.n_layers``."""
        return int(self.model.cfg.n_layers)

    def check_patchable(self) -> None:
        """Patching runs ``HookedTransformer`` (no shortformer embeddings) and ``HookedEncoder``
        models (these from their tokens: they cannot start a forward pass at a layer)."""
        model = self.model
        if getattr(model.cfg, "positional_embedding_type", "standard") == "shortformer":
            raise ValueError("shortformer positional embeddings are not supported by patching")
        if not hasattr(model, "blocks"):
            raise ValueError("patching needs a TransformerLens model with .blocks and .cfg")

    def input_state(self, inputs: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream before block 0 (embeddings); an encoder's tokens."""
        if self.is_encoder:
            return inputs
        return self.model(inputs, stop_at_layer=0)

    def forward(self, inputs: Int[Tensor, "batch pos"], readout: Readout) -> Tensor:
        """All blocks on ``inputs`` (hooks fire), then ``readout`` of the final residual."""
        if self.is_encoder:
            return readout(self.model, self.model.encoder_output(inputs, None, None))
        return readout(self.model, self.model(inputs, stop_at_layer=self.model.cfg.n_layers))

    def layer_states(
        self, inputs: Int[Tensor, "batch pos"], hook_names: Sequence[str], readout: Readout
    ) -> tuple[list[Tensor], dict[str, Tensor], Tensor]:
        """``resid_pre`` of every layer (``[n_layers]`` = final residual), activations, output.

        Encoders return only their tokens as states (patching runs them from layer 0)."""
        model = self.model
        acts: dict[str, Tensor] = {}

        def save(act, hook):
            acts[hook.name] = act.detach()

        if self.is_encoder:
            with model.hooks(fwd_hooks=named_hooks(hook_names, save)):
                out = self.forward(inputs, readout)
            return [inputs], acts, out.detach()

        resids = [model(inputs, stop_at_layer=0)]
        with model.hooks(fwd_hooks=[(h, save) for h in hook_names]):
            for layer in range(model.cfg.n_layers):
                resids.append(model(resids[-1], start_at_layer=layer, stop_at_layer=layer + 1))
        out = readout(model, resids[-1])
        return [r.detach() for r in resids], acts, out.detach()

    def run_from_layer(self, state: Tensor, layer: int, readout: Readout) -> Tensor:
        """Blocks ``layer..`` on the residual ``state`` (hooks fire), then ``readout``; an
        encoder runs from its tokens (``layer`` 0)."""
        if self.is_encoder:
            if layer != 0:
                raise ValueError("a HookedEncoder runs patching from its tokens only (layer 0)")
            return self.forward(state, readout)
        model = self.model
        final = model(state, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
        return readout(model, final)


register_adapter(is_transformer_lens, TransformerLensAdapter)
