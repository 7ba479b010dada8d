"""The shared base of the adapters of text models (TransformerLens 3.9 ``HookedTransformer`` /
``HookedEncoder`` and TransformerLens 4 ``TransformerBridge``): a tokenizer, a pooled readout,
whether the model is causal, and its identity for saved masks."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from subroutine_circuits.adapters.base import ModelAdapter


class TextModelAdapter(ModelAdapter):
    """What the text-model adapters share (see the module docstring).

    Args:
        model: the model; ``accepts(model)`` must hold, else ``ValueError`` names ``expected``.
        tokenizer: encodes stimulus texts (``encode_batch(texts) -> (tokens, lengths)``);
            needed by :meth:`encode_stimuli` / :meth:`encode_problems` only.
        pool: ``"last"`` / ``"mean"`` readout; None: the model's ``sc_pool`` attribute, else last.
    """

    #: whether a model belongs to this adapter, and what the error says it should be
    accepts: Callable[[Any], bool]
    expected: str = "a model"

    def __init__(self, model: nn.Module, tokenizer: Any = None, pool: str | None = None):
        if not type(self).accepts(model):
            raise ValueError(
                f"{type(self).__name__} needs {self.expected}, got {type(model).__name__}"
            )
        super().__init__(model)
        from subroutine_circuits.models.readout import resolve_pool

        self.tokenizer = tokenizer
        self.pool = resolve_pool(model, pool)

    @property
    @abstractmethod
    def is_encoder(self) -> bool:
        """True for a BERT-style encoder."""

    @property
    def causal(self) -> bool:
        """A decoder with causal attention (not an encoder, not bidirectional)."""
        direction = getattr(self.model.cfg, "attention_dir", "causal")
        return not self.is_encoder and direction == "causal"

    def class_name(self) -> str:
        """The model class name saved with masks."""
        return type(self.model).__name__

    def signature(self) -> dict[str, Any]:
        """Class name and ``n_layers, d_model, n_heads, d_head, d_mlp, d_vocab``."""
        from subroutine_circuits.masks.io import SIGNATURE_FIELDS

        sig: dict[str, Any] = {"model_class": self.class_name()}
        for f in SIGNATURE_FIELDS:
            v = getattr(self.model.cfg, f, None)
            sig[f] = int(v) if isinstance(v, (int, float)) and v is not None else v
        return sig

    def encode_stimuli(self, stimuli: Sequence[str]) -> dict[str, Tensor]:
        """``{"tokens": [n, pos] right-padded, "lengths": [n]}`` from the tokenizer."""
        if self.tokenizer is None:
            raise ValueError("this adapter has no tokenizer: as_adapter(model, tokenizer=...)")
        tokens, lengths = self.tokenizer.encode_batch(list(stimuli))
        return {
            "tokens": torch.as_tensor(tokens).long(),
            "lengths": torch.as_tensor(lengths).long(),
        }
