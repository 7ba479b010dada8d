"""Padded token batches through TransformerLens models: the family-specific part of the batched
mask engine (``experiment.batched``, ``experiment.converge``), kept here with the adapters.

The engine registers one key-padding hook per forward pass loop (:func:`padding_hooks`, reading
``pad_state["pad"]``) instead of one per call, and runs already validated, trimmed tokens with no
host sync. How padding enters and where the final residual is read depend on the family:

- TransformerLens 3.9 ``HookedTransformer`` (and this library's native model): padded keys masked
  by the hooks on ``hook_attn_scores``, the blocks run with ``stop_at_layer``, ``ln_final``
  (when the model has one), then pooling;
- ``HookedEncoder``: ``encoder_output`` with the one-zero attention mask;
- TransformerLens 4 ``TransformerBridge``: padding goes in as ``attention_mask`` (edits of
  ``hook_attn_scores`` are discarded there), the pooled final hidden state from
  ``models.tl_compat.final_hidden``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from subroutine_circuits.masks.units import UnitMap

__all__ = ["ooo_scores_padded", "padded_pass", "padding_hooks", "tl_unit_map"]


def tl_unit_map(model: nn.Module, layers: Any = None, kinds: Any = None) -> UnitMap:
    """Heads and neurons of a TransformerLens model (``adapters.transformer_lens.tl_unit_map``)."""
    from subroutine_circuits.adapters.transformer_lens import tl_unit_map as _units

    return _units(model, kinds=kinds, layers=layers)


def readout_hook_names(
    model: nn.Module, pool: str, ablation: str | None = None
) -> frozenset[str] | None:
    """The hooks that see only the readout position (one per row) in
    :func:`ooo_scores_padded` with ``readout_only=True``, or None where that pass does not
    apply: the ``"mean"`` readout, a model without ``readout_residual`` (TransformerLens' own
    classes and Hugging Face bridges run every position), or ``ablation="resample"`` (its
    sources are aligned position by position)."""
    if pool != "last" or ablation == "resample" or not hasattr(model, "readout_residual"):
        return None
    return model.readout_hook_names()


def ooo_scores_padded(
    model: nn.Module,
    tokens: Int[Tensor, "b 4 pos"],
    lengths: Int[Tensor, "b 4"],
    pool: str,
    pad_state: dict,
    readout_only: bool = False,
) -> Float[Tensor, "b 4"]:
    """OOO logits of already validated tokens, with no host sync.

    Same computation as ``models.ooo_logits`` (padded keys masked, ``ln_final``, pooling, OOO
    scores) but the key-padding hook is registered once by the caller and reads
    ``pad_state["pad"]``, and ``tokens`` are trimmed by the caller. ``readout_only`` (where
    :func:`readout_hook_names` is not None): the last block runs at the readout position only
    (``readout_residual``; the same numbers within float rounding), so the hooks it names see
    one position per row.
    """
    from subroutine_circuits.models.readout import key_padding_mask, ooo_scores, pool_positions
    from subroutine_circuits.models.tl_compat import final_hidden, is_bridge

    b, n_stim, pos = tokens.shape
    flat = tokens.reshape(b * n_stim, pos)
    flat_len = lengths.reshape(b * n_stim)
    pad = key_padding_mask(flat_len, pos)
    pad_state["pad"] = pad
    if is_bridge(model):  # TL 4: padding goes in as attention_mask (score hooks are ignored)
        emb = final_hidden(model, flat, flat_len, pool)
        return ooo_scores(emb.view(b, n_stim, -1))
    if readout_only and readout_hook_names(model, pool) is not None:
        emb = model.readout_residual(flat, flat_len - 1)
        return ooo_scores(emb.view(b, n_stim, -1))
    if hasattr(model, "encoder_output") and hasattr(model, "mlm_head"):
        resid = model.encoder_output(flat, None, (~pad).long())
    else:
        resid = model(flat, stop_at_layer=model.cfg.n_layers)
        ln_final = getattr(model, "ln_final", None)  # None: normalization_type=None models
        resid = ln_final(resid) if ln_final is not None else resid
    emb = pool_positions(resid, flat_len, pool)
    return ooo_scores(emb.view(b, n_stim, -1))


def padded_pass(
    model: nn.Module, tokens: Int[Tensor, "n pos"], lengths: Int[Tensor, " n"], pad_state: dict
) -> None:
    """Run the blocks on ``tokens`` (padded keys masked through ``pad_state``), no readout."""
    from subroutine_circuits.models.readout import key_padding_mask
    from subroutine_circuits.models.tl_compat import final_hidden, is_bridge

    pad = key_padding_mask(lengths, tokens.shape[1])
    pad_state["pad"] = pad
    if is_bridge(model):  # TL 4: padding goes in as attention_mask (score hooks are ignored)
        final_hidden(model, tokens, lengths)
        return
    if hasattr(model, "encoder_output") and hasattr(model, "mlm_head"):
        model.encoder_output(tokens, None, (~pad).long())
    else:
        model(tokens, stop_at_layer=model.cfg.n_layers)


def padding_hooks(model: nn.Module, pad_state: dict) -> list[tuple[str, Any]]:
    """Key-padding hooks on every ``hook_attn_scores`` reading ``pad_state["pad"]``.

    None for TransformerBridge models: their padding goes in as ``attention_mask=`` (see
    :func:`ooo_scores_padded`), and edits of ``hook_attn_scores`` are discarded there (with a
    warning per forward pass on 4.x).
    """
    from subroutine_circuits.models.tl_compat import is_bridge

    if is_bridge(model):
        return []

    def mask_scores(scores: Float[Tensor, "n head q k"], hook) -> Float[Tensor, "n head q k"]:
        return scores.masked_fill(pad_state["pad"][:, None, None, :], float("-inf"))

    return [(n, mask_scores) for n in model.hook_dict if n.endswith("attn.hook_attn_scores")]
