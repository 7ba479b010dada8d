"""Load a user's own local Hugging Face checkpoint into TransformerLens, with no network access.

``load_hf_checkpoint(path)`` reads a directory written by ``save_pretrained`` (``config.json`` plus
weights, optionally a tokenizer) and returns a TransformerLens model whose outputs equal those of
the Hugging Face model:

- GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``) -> ``HookedTransformer`` (causal), logits equal;
- BERT (``BertForMaskedLM`` / ``BertForPreTraining`` / ``BertModel``) -> ``HookedEncoder``
  (bidirectional), final hidden states and masked-LM logits equal.

TransformerLens' own ``from_pretrained`` resolves official model names on the Hub, so it is not
used: the ``HookedTransformerConfig`` is built here from the Hugging Face config, and the weights
are converted with TransformerLens' conversion function (GPT-2) or the converter below (BERT,
which also handles checkpoints without pooler / next-sentence head). No weight processing (no
LayerNorm folding, no centering) is applied, so the outputs are unchanged.

Importing this module imports neither ``transformers`` nor ``transformer_lens``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

#: Hugging Face architectures (``config.json`` ``architectures[0]``) that can be loaded, mapped to
#: the model family they belong to.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
    "BertForMaskedLM": "bert",
    "BertForPreTraining": "bert",
    "BertModel": "bert",
}

#: Architecture assumed when ``config.json`` has no ``architectures`` entry, by ``model_type``.
_DEFAULT_ARCHITECTURE_FOR_TYPE: dict[str, str] = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel"}

#: File names whose presence means the directory holds a tokenizer.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)

#: File names under which ``save_pretrained`` writes weights (single file or sharded index).
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

#: Activation functions TransformerLens implements (names as Hugging Face writes them).
_TL_ACTIVATIONS: tuple[str, ...] = (
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "relu",
    "silu",
)


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    """Temporarily set ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` (restored afterwards).

    ``local_files_only=True`` is passed to every Hugging Face call as well; the environment
    variables are a second guard for code paths inside TransformerLens that do not pass it.
    """
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {name: os.environ.get(name) for name in names}
    try:
        for name in names:
            os.environ[name] = "1"
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_checkpoint_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The folder of a Hugging Face checkpoint and its ``config.json`` as a dict; a path that
    is not a directory, a missing config or one that is not a JSON object raise ValueError
    naming the problem."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(
            f"Hugging Face checkpoint path {str(path)!r} is not a directory "
            "(expected a folder written by save_pretrained)"
        )
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"no config.json in Hugging Face checkpoint directory {str(directory)!r} "
            "(expected a folder written by save_pretrained)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"config.json in {str(directory)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"config.json in {str(directory)!r} is not a JSON object")
    return directory, config


def read_hf_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any], str]:
    """Validate a checkpoint directory and return ``(dir, config.json dict, architecture)``.

    Raises ``ValueError`` if ``path`` is not a directory, has no ``config.json`` (or it is not
    valid JSON), has no weights file, or names an architecture that is not supported.
    """
    directory, config = read_checkpoint_config(path)

    architectures = config.get("architectures") or []
    if architectures:
        architecture = str(architectures[0])
    else:
        model_type = str(config.get("model_type", "<missing model_type>"))
        architecture = _DEFAULT_ARCHITECTURE_FOR_TYPE.get(model_type, model_type)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r} in {str(directory / 'config.json')!r}; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"no weights file in Hugging Face checkpoint directory {str(directory)!r}; "
            f"expected one of: {', '.join(WEIGHT_FILES)}"
        )
    return directory, config, architecture


def _check_activation(name: Any, field: str) -> str:
    """Return ``name`` if TransformerLens implements it, else raise a ``ValueError``."""
    if not isinstance(name, str) or name not in _TL_ACTIVATIONS:
        raise ValueError(
            f"unsupported activation function {field}={name!r}; "
            f"TransformerLens supports: {', '.join(_TL_ACTIVATIONS)}"
        )
    return name


def gpt2_tl_config(
    hf_config: Any, architecture: str, device: str, dtype: torch.dtype, model_name: str
) -> Any:
    """Build the ``HookedTransformerConfig`` equivalent to a Hugging Face ``GPT2Config``."""
    from transformer_lens import HookedTransformerConfig

    if getattr(hf_config, "add_cross_attention", False):
        raise ValueError(
            "GPT-2 checkpoints with cross-attention (add_cross_attention) are not supported"
        )
    n_embd, n_head = int(hf_config.n_embd), int(hf_config.n_head)
    if n_embd % n_head != 0:
        raise ValueError(f"GPT-2 n_embd={n_embd} is not divisible by n_head={n_head}")
    n_inner = getattr(hf_config, "n_inner", None)
    return HookedTransformerConfig(
        n_layers=int(hf_config.n_layer),
        d_model=n_embd,
        n_heads=n_head,
        d_head=n_embd // n_head,
        d_mlp=int(n_inner) if n_inner is not None else 4 * n_embd,
        d_vocab=int(hf_config.vocab_size),
        n_ctx=int(hf_config.n_positions),
        act_fn=_check_activation(hf_config.activation_function, "activation_function"),
        eps=float(hf_config.layer_norm_epsilon),
        normalization_type="LN",
        attention_dir="causal",
        positional_embedding_type="standard",
        use_attn_scale=bool(getattr(hf_config, "scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(
            getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)
        ),
        original_architecture=architecture,
        model_name=model_name,
        tokenizer_name=None,
        init_weights=False,
        device=device,
        dtype=dtype,
    )


def bert_tl_config(
    hf_config: Any, architecture: str, device: str, dtype: torch.dtype, model_name: str
) -> Any:
    """Build the ``HookedTransformerConfig`` (for ``HookedEncoder``) equivalent to a BertConfig."""
    from transformer_lens import HookedTransformerConfig

    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise ValueError(
            "BERT checkpoints configured as a decoder (is_decoder / add_cross_attention) "
            "are not supported; HookedEncoder is bidirectional"
        )
    position_type = getattr(hf_config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise ValueError(
            f"unsupported BERT position_embedding_type={position_type!r}; only 'absolute' is"
        )
    if int(getattr(hf_config, "type_vocab_size", 2)) != 2:
        raise ValueError(
            f"unsupported BERT type_vocab_size={hf_config.type_vocab_size}; HookedEncoder has "
            "exactly 2 token types"
        )
    hidden, n_head = int(hf_config.hidden_size), int(hf_config.num_attention_heads)
    if hidden % n_head != 0:
        raise ValueError(f"BERT hidden_size={hidden} is not divisible by heads={n_head}")
    return HookedTransformerConfig(
        n_layers=int(hf_config.num_hidden_layers),
        d_model=hidden,
        n_heads=n_head,
        d_head=hidden // n_head,
        d_mlp=int(hf_config.intermediate_size),
        d_vocab=int(hf_config.vocab_size),
        n_ctx=int(hf_config.max_position_embeddings),
        act_fn=_check_activation(hf_config.hidden_act, "hidden_act"),
        eps=float(hf_config.layer_norm_eps),
        normalization_type="LN",
        attention_dir="bidirectional",
        original_architecture=architecture,
        model_name=model_name,
        tokenizer_name=None,
        init_weights=False,
        device=device,
        dtype=dtype,
    )


def convert_gpt2_state_dict(hf_model: Any, cfg: Any) -> dict[str, Tensor]:
    """HF ``GPT2LMHeadModel`` / ``GPT2Model`` -> TransformerLens ``HookedTransformer`` state dict.

    Uses TransformerLens' ``convert_gpt2_weights``; a bare ``GPT2Model`` (no LM head) gets the
    unembedding tied to the token embedding, as ``GPT2LMHeadModel`` does. GPT-2 has no output
    bias, so ``unembed.b_U`` is zero.
    """
    from types import SimpleNamespace

    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    if hasattr(hf_model, "transformer"):
        source = hf_model
    else:  # GPT2Model: the transformer itself, no lm_head
        source = SimpleNamespace(
            transformer=hf_model, lm_head=SimpleNamespace(weight=hf_model.wte.weight)
        )
    state_dict = convert_gpt2_weights(source, cfg)
    state_dict["unembed.b_U"] = torch.zeros(cfg.d_vocab, dtype=state_dict["embed.W_E"].dtype)
    return state_dict


def _heads_in(weight: Float[Tensor, "heads_dhead d_model"], n_heads: int) -> Tensor:
    """``nn.Linear`` weight ``[n_heads*d_head, d_model]`` -> TL ``[n_heads, d_model, d_head]``."""
    return weight.reshape(n_heads, -1, weight.shape[1]).transpose(1, 2)


def convert_bert_state_dict(hf_model: Any, cfg: Any) -> dict[str, Tensor]:
    """HF BERT (``BertForMaskedLM`` / ``BertForPreTraining`` / ``BertModel``) -> HookedEncoder.

    Returns the entries that exist in the checkpoint: embeddings and blocks always; ``pooler.*``
    if the model has a pooler; ``mlm_head.*`` / ``unembed.*`` if it has a masked-LM head;
    ``nsp_head.*`` if it has a next-sentence head. ``_fill_missing_encoder_params`` supplies the
    rest.
    """
    bert = hf_model.bert if hasattr(hf_model, "bert") else hf_model
    n = cfg.n_heads
    emb = bert.embeddings
    sd: dict[str, Tensor] = {
        "embed.embed.W_E": emb.word_embeddings.weight,
        "embed.pos_embed.W_pos": emb.position_embeddings.weight,
        "embed.token_type_embed.W_token_type": emb.token_type_embeddings.weight,
        "embed.ln.w": emb.LayerNorm.weight,
        "embed.ln.b": emb.LayerNorm.bias,
    }
    for layer, block in enumerate(bert.encoder.layer):
        att = block.attention.self
        p = f"blocks.{layer}"
        sd[f"{p}.attn.W_Q"] = _heads_in(att.query.weight, n)
        sd[f"{p}.attn.b_Q"] = att.query.bias.reshape(n, -1)
        sd[f"{p}.attn.W_K"] = _heads_in(att.key.weight, n)
        sd[f"{p}.attn.b_K"] = att.key.bias.reshape(n, -1)
        sd[f"{p}.attn.W_V"] = _heads_in(att.value.weight, n)
        sd[f"{p}.attn.b_V"] = att.value.bias.reshape(n, -1)
        out = block.attention.output
        # dense.weight is [d_model, n_heads*d_head] -> [n_heads, d_head, d_model]
        sd[f"{p}.attn.W_O"] = out.dense.weight.T.reshape(n, -1, cfg.d_model)
        sd[f"{p}.attn.b_O"] = out.dense.bias
        sd[f"{p}.ln1.w"] = out.LayerNorm.weight
        sd[f"{p}.ln1.b"] = out.LayerNorm.bias
        sd[f"{p}.mlp.W_in"] = block.intermediate.dense.weight.T
        sd[f"{p}.mlp.b_in"] = block.intermediate.dense.bias
        sd[f"{p}.mlp.W_out"] = block.output.dense.weight.T
        sd[f"{p}.mlp.b_out"] = block.output.dense.bias
        sd[f"{p}.ln2.w"] = block.output.LayerNorm.weight
        sd[f"{p}.ln2.b"] = block.output.LayerNorm.bias

    pooler = getattr(bert, "pooler", None)
    if pooler is not None:
        sd["pooler.W"] = pooler.dense.weight.T
        sd["pooler.b"] = pooler.dense.bias
    cls = getattr(hf_model, "cls", None)
    predictions = getattr(cls, "predictions", None)
    if predictions is not None:
        sd["mlm_head.W"] = predictions.transform.dense.weight.T
        sd["mlm_head.b"] = predictions.transform.dense.bias
        sd["mlm_head.ln.w"] = predictions.transform.LayerNorm.weight
        sd["mlm_head.ln.b"] = predictions.transform.LayerNorm.bias
        sd["unembed.W_U"] = predictions.decoder.weight.T
        bias = predictions.decoder.bias
        sd["unembed.b_U"] = bias if bias is not None else predictions.bias
    nsp = getattr(cls, "seq_relationship", None)
    if nsp is not None:
        sd["nsp_head.W"] = nsp.weight.T
        sd["nsp_head.b"] = nsp.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def _fill_missing_encoder_params(sd: dict[str, Tensor], model: Any) -> list[str]:
    """Give HookedEncoder parameters the checkpoint lacks deterministic values; return their names.

    HookedEncoder allocates parameters with ``torch.empty`` (uninitialised memory), so heads the
    checkpoint does not have must be filled: pooler / NSP head -> zeros; a missing MLM head (a
    bare ``BertModel``) -> identity transform with unit LayerNorm and an unembedding tied to the
    token embedding (a placeholder, not a trained head: its logits are not meaningful).
    """
    filled = []
    W_E = sd["embed.embed.W_E"]
    for name, param in model.named_parameters():
        if name in sd:
            continue
        if name == "mlm_head.W":
            value = torch.eye(param.shape[0], dtype=param.dtype)
        elif name == "mlm_head.ln.w":
            value = torch.ones_like(param)
        elif name == "unembed.W_U":
            value = W_E.T.clone()
        elif name.startswith(("pooler.", "nsp_head.", "mlm_head.", "unembed.")):
            value = torch.zeros_like(param)
        else:  # a block / embedding parameter missing would be a conversion bug
            raise RuntimeError(f"BERT conversion produced no value for parameter {name!r}")
        sd[name] = value.to(param.device)
        filled.append(name)
    return filled


def _load_params(model: Any, sd: dict[str, Tensor]) -> None:
    """Load ``sd`` into ``model``: every parameter must be covered, nothing unknown is allowed."""
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - set(sd))
    unexpected = sorted(set(sd) - set(model.state_dict()))
    if missing or unexpected:
        raise RuntimeError(
            f"weight conversion mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    model.load_state_dict(sd, strict=False)


class _Activation(torch.nn.Module):
    """Wrap an activation function as a module (to replace HookedEncoder's MLM-head GELU)."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """Apply the wrapped activation elementwise."""
        return self.fn(x)


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds tokenizer files (see ``TOKENIZER_FILES``)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_local_tokenizer(directory: str | os.PathLike) -> Any | None:
    """Load the tokenizer saved in ``directory`` (``AutoTokenizer``, local files only), or None.

    Raises ``ValueError`` if tokenizer files are present but cannot be loaded.
    """
    if not has_tokenizer(directory):
        return None
    from transformers import AutoTokenizer

    try:
        with _offline_env():
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"tokenizer files in {str(directory)!r} could not be loaded: {err}"
        ) from err


def load_hf_checkpoint(
    path: str | os.PathLike,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    hf_model: Any | None = None,
) -> tuple[Any, Any | None]:
    """Load a local Hugging Face checkpoint as a TransformerLens model, without any network access.

    Args:
        path: directory written by ``save_pretrained`` (``config.json`` + weights; optionally
            tokenizer files).
        device: device of the returned model.
        dtype: parameter dtype of the returned model.
        hf_model: a Hugging Face model of the folder's architecture to convert instead of the
            saved weights (e.g. one freshly initialised from the folder's config).

    Returns:
        ``(model, tokenizer_or_None)``: GPT-2 checkpoints give a causal ``HookedTransformer``,
        BERT checkpoints a bidirectional ``HookedEncoder``; both in eval mode, with outputs equal to
        the Hugging Face model's (no LayerNorm folding or weight centering). The tokenizer is the
        ``AutoTokenizer`` loaded from the directory (None if there is none); it is also attached
        to the model (``HookedTransformer.set_tokenizer`` / ``HookedEncoder.tokenizer``).

    Raises:
        ValueError: ``path`` is not a directory, has no ``config.json`` or weights, names an
            unsupported architecture (the message lists the supported ones), or uses a feature
            TransformerLens cannot represent (activation function, cross-attention, ...).
    """
    directory, _, architecture = read_hf_config(path)
    family = SUPPORTED_ARCHITECTURES[architecture]
    import transformers

    if hf_model is None:
        hf_class = getattr(transformers, architecture)
        with _offline_env(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_model = hf_class.from_pretrained(
                str(directory),
                local_files_only=True,
                attn_implementation="eager",
                dtype=dtype,
            )
    hf_model.eval()
    tokenizer = load_local_tokenizer(directory)
    model_name = directory.resolve().name

    if family == "gpt2":
        from transformer_lens import HookedTransformer

        cfg = gpt2_tl_config(hf_model.config, architecture, device, dtype, model_name)
        sd = convert_gpt2_state_dict(hf_model, cfg)
        sd = {k: v.detach().clone() for k, v in sd.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer(cfg, move_to_device=False)
        _load_params(model, sd)
        if tokenizer is not None:
            with _offline_env():
                model.set_tokenizer(tokenizer)
    else:
        from transformer_lens import HookedEncoder

        cfg = bert_tl_config(hf_model.config, architecture, device, dtype, model_name)
        sd = convert_bert_state_dict(hf_model, cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedEncoder(cfg, tokenizer=tokenizer, move_to_device=False)
        filled = _fill_missing_encoder_params(sd, model)
        if any(name.startswith("mlm_head.") for name in filled):
            warnings.warn(
                f"{architecture} checkpoint {str(directory)!r} has no masked-LM head; "
                "HookedEncoder's MLM head is a placeholder (identity + tied unembedding), "
                "so its logits are not meaningful (hidden states are exact)",
                stacklevel=2,
            )
        _load_params(model, sd)
        # HookedEncoder's MLM head always applies exact GELU; Hugging Face applies hidden_act.
        if cfg.act_fn != "gelu":
            from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

            model.mlm_head.act_fn = _Activation(SUPPORTED_ACTIVATIONS[cfg.act_fn])
    model.to(device)
    model.eval()
    del hf_model
    return model, tokenizer
