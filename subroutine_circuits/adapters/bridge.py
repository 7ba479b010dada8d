"""The TransformerLens 4 adapter: ``TransformerBridge`` models, native (``boot_native``) or
wrapping a Hugging Face model (``boot_transformers``: GPT-2, BERT, Pythia, Llama, ...).

Units are the same as for TransformerLens 3.9: heads of ``blocks.{l}.attn.hook_z`` (axis 2 of
``[batch, pos, head, d_head]``) and neurons of ``blocks.{l}.mlp.hook_post`` (axis 2 of
``[batch, pos, d_mlp]``). What differs from 3.9 (measured on 4.3, see ``docs/TL4_NOTES.md``) is
handled by :mod:`subroutine_circuits.models.tl_compat`:

- padding goes in as ``attention_mask=`` (edits of ``hook_attn_scores`` are discarded);
- the readout is the normalised final residual stream (``ln_final.hook_out``; for BERT-style
  encoders the last block's output), captured by a hook that ends the pass before the unembed;
- maskable weights are the ``weight`` of the wrapped ``nn.Linear`` / ``Conv1D`` modules behind
  ``blocks.{l}.attn.{q,k,v,o}`` and ``blocks.{l}.mlp.{in,gate,out}``.

Patching runs the whole model from its tokens (``can_start_at_layer = False``): a bridge's own
``start_at_layer`` still runs the earlier blocks and is wrong on BERT, so starting at a layer
would save nothing. Importing this module imports neither ``transformer_lens`` nor
``transformers``.
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
from subroutine_circuits.masks.units import UnitMap
from subroutine_circuits.models import tl_compat as tc
from subroutine_circuits.utils import real_positions


def is_bridge_model(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (no import of TL)."""
    return tc.is_bridge(model) and hasattr(model, "cfg")


# ------------------------------------------------------------------------------ patching readouts
# A bridge's patching state at the end of the model is its normalised final residual stream
# ``[n, pos, d_model]`` (see :meth:`BridgeAdapter.forward`), except for the logits readout,
# whose state is the logits themselves.


def bridge_logits_readout(model, logits: Float[Tensor, "n pos d_vocab"]) -> Tensor:
    """The model's logits (the forward pass ran to the unembedding)."""
    return logits


def bridge_hidden_last(model, resid: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n d_model"]:
    """Normalised final residual at the last position (inputs are unpadded)."""
    return resid[:, -1]


def bridge_hidden_mean(model, resid: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n d_model"]:
    """Normalised final residual averaged over positions (inputs are unpadded)."""
    return resid.mean(dim=1)


BRIDGE_READOUTS: dict[str, Readout] = {
    "logits": bridge_logits_readout,
    "hidden_last": bridge_hidden_last,
    "hidden_mean": bridge_hidden_mean,
}


class BridgeAdapter(TextModelAdapter):
    """Adapter for TransformerLens 4 ``TransformerBridge`` models (native or Hugging Face).

    Args:
        model: the bridge.
        tokenizer: encodes stimulus texts (``encode_batch(texts) -> (tokens, lengths)``, e.g.
            ``tasks.hf_tokenizer.HFTaskTokenizer``); needed by :meth:`encode_stimuli` only.
        pool: ``"last"`` / ``"mean"`` readout; None: the model's ``sc_pool`` attribute, else last.
    """

    family = "bridge"
    readouts = BRIDGE_READOUTS
    can_start_at_layer = False

    accepts = staticmethod(lambda model: is_bridge_model(model))
    expected = "a TransformerBridge"

    @property
    def is_encoder(self) -> bool:
        """True for a bridge around a BERT-style encoder."""
        return tc.is_encoder(self.model)

    # ------------------------------------------------------------------ identity / units
    def unit_map(
        self, kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None
    ) -> UnitMap:
        """Heads and/or neurons, per layer heads first (as for TransformerLens 3.9)."""
        kinds = tc.UNIT_KINDS if kinds is None else tuple(kinds)
        return UnitMap(tc.unit_groups(self.model, kinds, None if layers is None else list(layers)))

    def check_unit_map(self, unit_map: UnitMap) -> None:
        """Raise ValueError if ``unit_map`` does not fit this model (hooks and sizes)."""
        from subroutine_circuits.adapters.transformer_lens import check_unit_sizes

        check_unit_sizes(self.model, unit_map)

    def weight_names(self) -> list[str]:
        """The q/k/v/o and MLP in/gate/out weight matrices (``tl_compat.maskable_weights``)."""
        return [w.name for w in tc.maskable_weights(self.model)]

    def init_std(self) -> float | None:
        """``cfg.initializer_range``."""
        return getattr(self.model.cfg, "initializer_range", None)

    def reinit(self, seed: int) -> None:
        """Re-initialise every weight in place with the architecture's own initialiser.

        Hugging Face-backed bridges: a fresh model of the same class built from the folder's
        config under ``seed`` (Hugging Face's initialiser); native bridges: ``boot_native`` with
        the same config and ``seed``. Its state then replaces the model's.
        """
        from subroutine_circuits.models.bridge import SOURCE_ATTR, load_task_model

        source = getattr(self.model, SOURCE_ATTR, None)
        if source is not None:
            fresh, _ = load_task_model(
                source, device=str(self.device), reinit_seed=seed, backend="bridge"
            )
        elif getattr(self.model, "original_model", None) is None or self._is_native():
            fresh = self._fresh_native(seed)
        else:
            raise ValueError(
                "cannot re-initialise a Hugging Face bridge that was not loaded from a folder "
                "(load it with subroutine_circuits.load_model(path))"
            )
        self.model.load_state_dict(fresh.state_dict(), strict=True)

    def _is_native(self) -> bool:
        return getattr(self.model.cfg, "model_name", None) == "native"

    def _fresh_native(self, seed: int) -> nn.Module:
        import copy
        import warnings

        from transformer_lens.model_bridge import TransformerBridge

        cfg = copy.copy(self.model.cfg)
        cfg.seed = int(seed)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = TransformerBridge.boot_native(cfg)
        return fresh.to(self.device)

    # ------------------------------------------------------------------ stimuli and readout

    def _tokens(self, inputs: Mapping[str, Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        """``(tokens, lengths)`` on the model's device (lengths default to the full width)."""
        if isinstance(inputs, Tensor):
            tokens, lengths = inputs, None
        else:
            if "tokens" not in inputs:
                raise ValueError(f"inputs need 'tokens' (got {sorted(inputs)})")
            tokens, lengths = inputs["tokens"], inputs.get("lengths")
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[-1], dtype=torch.long)
        return tokens.to(self.device), torch.as_tensor(lengths).to(self.device).long()

    def _readout_mask(self, lengths: Tensor, pos: int) -> Tensor | None:
        """``[n, pos]``: True at the position the readout reads (last real token), if any."""
        if self.pool != "last":
            return None
        return torch.arange(pos, device=lengths.device)[None, :] == (lengths[:, None] - 1)

    def embed(self, inputs: Mapping[str, Tensor] | Tensor) -> Float[Tensor, "n d_model"]:
        """Normalised final hidden state at the readout token (or mean), padded keys masked."""
        tokens, lengths = self._tokens(inputs)
        max_len = int(lengths.max())
        tokens = tokens[..., :max_len]
        with readout_positions(self._readout_mask(lengths, max_len)):
            return tc.final_hidden(self.model, tokens, lengths, self.pool)

    def label_logits(self, inputs: Mapping[str, Tensor] | Tensor) -> Float[Tensor, "n vocab"]:
        """Vocabulary logits at the last real token."""
        tokens, lengths = self._tokens(inputs)
        logits = tc.full_logits(self.model, tokens[..., : int(lengths.max())], lengths)
        idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
        return logits.gather(1, idx).squeeze(1)

    # ------------------------------------------------------------------ ablation reference
    @torch.no_grad()
    def record_activations(
        self, inputs: Mapping[str, Tensor] | Tensor, hook_names: Sequence[str]
    ) -> Recorded:
        """Run the inputs (padded keys masked with ``attention_mask``) and record ``hook_names``.

        ``pos_mask`` marks real tokens, ``readout_mask`` the readout token (``pool="last"``).
        """
        tokens, lengths = self._tokens(inputs)
        pos = tokens.shape[1]
        acts: dict[str, Tensor] = {}

        def save(x: Tensor, hook) -> None:
            acts[hook.name] = x.detach()

        mask = tc.attention_mask_from_lengths(lengths, pos)
        with self.model.hooks(fwd_hooks=named_hooks(hook_names, save)):
            self.model(tokens, attention_mask=mask)
        return Recorded(acts, real_positions(lengths, pos), self._readout_mask(lengths, pos))

    # ------------------------------------------------------------------ patching
    @property
    def n_layers(self) -> int:
        """Patching starts at the inputs only (``0``)."""
        return 0

    def check_patchable(self) -> None:
        """Every bridge can be patched (from its tokens)."""
        if not hasattr(self.model, "hook_dict"):
            raise ValueError("patching needs a TransformerBridge with hook points")

    def _final_state(self, tokens: Int[Tensor, "batch pos"], readout: Readout) -> Tensor:
        """Logits for the logits readout, else the normalised final residual stream."""
        tokens = tokens.to(self.device)
        if readout is bridge_logits_readout:
            return self.model(tokens)
        return tc._bridge_capture(self.model, tc.final_hook_name(self.model), tokens)

    def forward(self, inputs: Int[Tensor, "batch pos"], readout: Readout) -> Tensor:
        """The whole model on unpadded ``inputs`` (hooks fire), then ``readout``."""
        return readout(self.model, self._final_state(inputs, readout))

    def layer_states(
        self, inputs: Int[Tensor, "batch pos"], hook_names: Sequence[str], readout: Readout
    ) -> tuple[list[Tensor], dict[str, Tensor], Tensor]:
        """``([inputs], activations at hook_names, readout output)`` of one forward pass."""
        acts: dict[str, Tensor] = {}

        def save(act, hook):
            acts[hook.name] = act.detach()

        with self.model.hooks(fwd_hooks=named_hooks(hook_names, save)):
            out = self.forward(inputs, readout)
        return [inputs], acts, out.detach()

    def run_from_layer(self, state: Tensor, layer: int, readout: Readout) -> Tensor:
        """The whole model from its tokens (``layer`` must be 0), then ``readout``."""
        if layer != 0:
            raise ValueError("BridgeAdapter runs patching from the inputs only (layer 0)")
        return self.forward(state, readout)


register_adapter(is_bridge_model, BridgeAdapter)
