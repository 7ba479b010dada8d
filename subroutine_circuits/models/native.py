"""A hooked transformer of this library's own, for TransformerLens 4.x (and 3.9).

TransformerLens 4 removed ``HookedTransformer`` but kept what a hooked model is made of
(``HookedRootModule``, ``HookPoint``, ``transformer_lens.patching``). :class:`NativeTransformer`
is built from those: a GPT-style transformer (or a bidirectional one) with the parameter names,
shapes, hook names and arithmetic of TransformerLens 3.9's ``HookedTransformer`` for the
configurations this library's presets use:

- learned absolute positions (``positional_embedding_type="standard"``);
- ``normalization_type`` ``"LN"``, ``"LNPre"``, ``"RMS"``, ``"RMSPre"`` or ``None``;
- MLPs with ``act_fn`` ``gelu``, ``gelu_new``, ``gelu_fast``, ``relu`` or ``silu`` (or none, with
  ``attn_only``); causal or bidirectional attention.

Its ``state_dict`` has the keys of a 3.9 ``HookedTransformer`` (``embed.W_E``,
``blocks.{l}.attn.W_Q`` ``[n_heads, d_model, d_head]``, ``blocks.{l}.mlp.W_in``
``[d_model, d_mlp]``, ...), so checkpoints move between the two, and the same seed draws the
same initial weights (GPT-2 initialisation, parameters drawn in the same order).
``tests/models/test_native.py`` compares it with 3.9's ``HookedTransformer`` activation by
activation.

Hooks (shapes as in TransformerLens): ``hook_embed`` / ``hook_pos_embed`` ``[batch, pos, d_model]``;
per block ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
``hook_resid_post`` ``[batch, pos, d_model]``; ``attn.hook_q/k/v/z`` ``[batch, pos, head,
d_head]``; ``attn.hook_attn_scores`` / ``hook_pattern`` ``[batch, head, q_pos, k_pos]`` (edits
take effect); ``mlp.hook_pre`` / ``hook_post`` ``[batch, pos, d_mlp]``; ``ln*.hook_scale``
``[batch, pos, 1]`` and ``hook_normalized``; ``unembed.hook_in`` / ``hook_out``.

A configuration outside that set (rotary positions, gated MLPs, grouped-query attention, ...) is
refused by name: on TransformerLens 3.9 ``models.make_model`` builds the real ``HookedTransformer``,
which has them; on 4.x a Hugging Face folder (``models.bridge``) covers other architectures.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from subroutine_circuits.models import cpu_kernels

NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "relu", "silu")


@dataclass
class NativeConfig:
    """The fields of TransformerLens 3.9's ``HookedTransformerConfig``, with its defaults.

    Only some are implemented (see the module docstring); :meth:`unsupported` names any other
    field whose value would change the computation. ``-1`` means "derive" as in TransformerLens:
    ``d_head = d_model // n_heads``, ``attn_scale = sqrt(d_head)``, ``initializer_range =
    0.8 / sqrt(d_model)``, ``d_vocab_out = d_vocab``; ``d_mlp=None`` means ``4 * d_model``.
    """

    n_layers: int
    d_model: int
    n_ctx: int
    d_head: int = -1
    model_name: str = "custom"
    n_heads: int = -1
    d_mlp: int | None = None
    act_fn: str = None  # type: ignore[assignment]  # typed as TransformerLens does (None: attn-only)
    d_vocab: int = -1
    eps: float = 1e-5
    use_attn_result: bool = False
    use_attn_scale: bool = True
    attn_scale: float = -1.0
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    use_local_attn: bool = False
    ungroup_grouped_query_attention: bool = False
    original_architecture: str | None = None
    from_checkpoint: bool = False
    checkpoint_index: int | None = None
    checkpoint_label_type: str | None = None
    checkpoint_value: int | None = None
    tokenizer_name: str | None = None
    window_size: int | None = None
    attn_types: list | None = None
    init_mode: str = "gpt2"
    normalization_type: str | None = "LN"
    device: str | None = None
    n_devices: int = 1
    attention_dir: str = "causal"
    attn_only: bool = False
    seed: int | None = None
    initializer_range: float = -1.0
    init_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    positional_embedding_type: str = "standard"
    final_rms: bool = False
    d_vocab_out: int = -1
    parallel_attn_mlp: bool = False
    rotary_dim: int | None = None
    n_params: int | None = None
    use_hook_tokens: bool = False
    gated_mlp: bool = False
    default_prepend_bos: bool = True
    dtype: torch.dtype = torch.float32
    tokenizer_prepends_bos: bool | None = None
    n_key_value_heads: int | None = None
    post_embedding_ln: bool = False
    rotary_base: float | int = 10000
    rotary_base_local: float | int | None = None
    trust_remote_code: bool = False
    rotary_adjacent_pairs: bool = False
    load_in_4bit: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    uses_rms_norm: bool = False
    layer_norm_folding: bool = False
    use_qk_norm: bool = False
    clip_qkv: float | None = None
    use_logn_attn: bool = False
    train_seq_length: int | None = None
    use_dynamic_ntk_rope: bool = False
    rotary_scaling_factor: float = 1.0
    quantization_method: str | None = None
    relative_attention_max_distance: int | None = None
    relative_attention_num_buckets: int | None = None
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_normalization_before_and_after: bool = False
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    use_NTK_by_parts_rope: bool = False
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_by_parts_factor: float = 8.0
    NTK_original_ctx_len: int = 8192
    use_yarn_rope: bool = False
    yarn_factor: float = 1.0
    yarn_attention_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_truncate: bool = True
    yarn_global_attn_only: bool = False
    use_attention_sinks: bool = False
    norm_topk_prob: bool = False

    def __post_init__(self) -> None:
        if self.n_heads == -1 and self.d_head != -1:
            self.n_heads = self.d_model // self.d_head
        if self.d_head == -1 and self.n_heads > 0:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}"
                )
            self.d_head = self.d_model // self.n_heads
        for name in ("n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.attn_only:
            if self.d_mlp is None:
                self.d_mlp = 4 * self.d_model
            if self.act_fn is None:
                raise ValueError("act_fn must be set for a model with MLPs (or attn_only=True)")
        if self.initializer_range < 0:
            self.initializer_range = 0.8 / math.sqrt(self.d_model)
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.use_attn_scale and self.attn_scale == -1.0:
            self.attn_scale = math.sqrt(self.d_head)
        if self.device is None:
            self.device = "cpu"
        problems = self.unsupported()
        if problems:
            raise ValueError(
                "NativeTransformer does not implement "
                + ", ".join(problems)
                + " (the TransformerLens 3.9 HookedTransformer does: install transformer-lens<4, "
                "or give a Hugging Face folder, which runs on 4.x)"
            )

    def unsupported(self) -> list[str]:
        """``field=value`` for every setting this implementation would compute wrongly."""
        out = []
        if self.positional_embedding_type != "standard":
            out.append(f"positional_embedding_type={self.positional_embedding_type!r}")
        if self.normalization_type not in NORMS:
            out.append(f"normalization_type={self.normalization_type!r}")
        if not self.attn_only and self.act_fn not in ACTIVATIONS:
            out.append(f"act_fn={self.act_fn!r}")
        if self.attention_dir not in ("causal", "bidirectional"):
            out.append(f"attention_dir={self.attention_dir!r}")
        if self.init_mode != "gpt2":
            out.append(f"init_mode={self.init_mode!r}")
        if self.n_devices != 1:
            out.append(f"n_devices={self.n_devices}")
        if self.dtype not in (torch.float32, torch.float64):
            out.append(f"dtype={self.dtype}")
        flags = (
            "use_split_qkv_input", "use_attn_in", "use_local_attn",
            "scale_attn_by_inverse_layer_idx", "final_rms", "parallel_attn_mlp", "use_hook_tokens",
            "gated_mlp", "post_embedding_ln",
            "load_in_4bit", "uses_rms_norm", "use_qk_norm", "use_logn_attn",
            "use_dynamic_ntk_rope", "tie_word_embeddings", "use_normalization_before_and_after",
            "use_NTK_by_parts_rope", "use_yarn_rope", "use_attention_sinks",
        )  # fmt: skip
        out += [f"{name}=True" for name in flags if getattr(self, name)]
        for name in ("attn_scores_soft_cap", "output_logits_soft_cap"):
            if getattr(self, name) > 0:
                out.append(f"{name}={getattr(self, name)!r}")
        names = ("original_architecture", "n_key_value_heads", "num_experts", "clip_qkv",
                 "quantization_method")  # fmt: skip
        for name in names:
            if getattr(self, name) is not None:
                out.append(f"{name}={getattr(self, name)!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (``dtype`` as its name, e.g. ``"float32"``)."""
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NativeConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown NativeConfig field(s): {unknown}")
        d = dict(d)
        if isinstance(d.get("dtype"), str):
            d["dtype"] = getattr(torch, d["dtype"])
        return cls(**d)


def _gelu_new(x: Tensor) -> Tensor:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


def _gelu_fast(x: Tensor) -> Tensor:
    """The 'fast' tanh approximation of GELU (as in TransformerLens)."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


_ACT = {"gelu": F.gelu, "gelu_new": _gelu_new, "gelu_fast": _gelu_fast, "relu": F.relu,
        "silu": F.silu}  # fmt: skip


class LayerNorm(nn.Module):
    """LayerNorm (``rms=False``) or RMSNorm (``rms=True``) with ``hook_scale`` ``[batch, pos, 1]``
    and ``hook_normalized``; without ``affine`` (``LNPre`` / ``RMSPre``) no weight (and bias)."""

    def __init__(self, cfg: NativeConfig, affine: bool = True, rms: bool = False) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.rms = rms
        self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype)) if affine else None
        has_bias = affine and not rms
        self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype)) if has_bias else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not self.rms:
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale)
        if self.w is None:
            return x
        return x * self.w if self.b is None else x * self.w + self.b


def _norm(cfg: NativeConfig) -> nn.Module:
    """The normalisation ``cfg.normalization_type`` names (identity for None)."""
    kind = cfg.normalization_type
    if kind is None:
        return nn.Identity()
    return LayerNorm(cfg, affine=kind in ("LN", "RMS"), rms=kind.startswith("RMS"))


class PrefixMemo:
    """The first attention layer's ``z`` (before ``hook_z``) of recent inputs, reused by later
    no-grad forward passes of the same input (or whole repeats of it along the batch).

    Why: fixed-mask evaluation runs the same problems under many masks, and nothing before the
    first masked hook (``blocks.0.attn.hook_z``) depends on the mask: the query, key and value
    projections, the scores and the softmax of layer 0 are the same in every pass. A lookup
    compares the attention input with a stored one exactly (``torch.equal``), so a pass on
    other inputs recomputes; up to ``size`` inputs are kept (2: a chunk's problems and the
    inputs a resample ablation records from). The hooks of layer 0 before ``hook_z``
    (``hook_q``, ``hook_k``, ``hook_v``, ``hook_attn_scores``, ``hook_pattern``) do not run on
    a reused pass, so the caller must hold them fixed while the memo is in use
    (:meth:`NativeTransformer.prefix_memo`; ``experiment.batched.fixed_mask_scores`` clears it
    for every chunk of problems, whose key padding is then fixed)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.entries: list[tuple[Tensor, Tensor]] = []
        self.hits = 0

    def clear(self) -> None:
        """Forget the stored inputs (e.g. a new chunk of problems)."""
        self.entries = []

    def lookup(self, x: Float[Tensor, "batch pos d_model"]) -> Tensor | None:
        """The stored ``z`` of ``x`` (repeated to ``x``'s batch when ``x`` is whole repeats of
        a stored input), bit for bit; else None."""
        for inp, z in self.entries:
            rows = inp.shape[0]
            if x.shape[1:] != inp.shape[1:] or rows == 0 or x.shape[0] % rows:
                continue
            m = x.shape[0] // rows
            if torch.equal(x.view(m, *inp.shape), inp.unsqueeze(0).expand(m, *inp.shape)):
                self.hits += 1
                return z if m == 1 else z.repeat(m, 1, 1, 1)
        return None

    def store(self, x: Float[Tensor, "batch pos d_model"], z: Tensor) -> None:
        """Keep ``x`` and its ``z`` (the oldest entry goes when ``size`` are stored)."""
        self.entries = [*self.entries, (x, z)][-self.size :]


class Attention(nn.Module):
    """Multi-head attention with TransformerLens' parameter layout and hooks."""

    def __init__(self, cfg: NativeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=cfg.dtype))

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=cfg.dtype))

        # registration order = TransformerLens 3.9's (initialisation draws in this order)
        self.W_Q = empty(h, d, dh)
        self.W_O = empty(h, dh, d)
        self.b_Q = zeros(h, dh)
        self.b_O = zeros(d)
        self.W_K = empty(h, d, dh)
        self.W_V = empty(h, d, dh)
        self.b_K = zeros(h, dh)
        self.b_V = zeros(h, dh)
        self.register_buffer("mask", torch.empty((0, 0), dtype=torch.bool))  # 3.9 layout
        self.register_buffer("IGNORE", torch.tensor(-torch.inf))
        self.attn_scale = cfg.attn_scale if cfg.use_attn_scale else 1.0
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_pattern = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model] (use_attn_result only)
        self.prefix_memo: PrefixMemo | None = None  # set by NativeTransformer.prefix_memo

    @staticmethod
    def _project(
        x: Float[Tensor, "batch pos d_model"],
        w: Float[Tensor, "head d_model d_head"],
        b: Float[Tensor, "head d_head"],
    ) -> Float[Tensor, "batch pos head d_head"]:
        flat = F.linear(x, w.permute(0, 2, 1).reshape(-1, w.shape[1]), b.reshape(-1))
        return flat.reshape(x.shape[0], x.shape[1], b.shape[0], b.shape[1])

    def forward(
        self,
        query_input: Float[Tensor, "batch pos d_model"],
        key_input: Float[Tensor, "batch pos d_model"],
        value_input: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        memo = self.prefix_memo
        usable = (
            memo is not None
            and attention_mask is None
            and not torch.is_grad_enabled()
            and query_input is key_input
            and key_input is value_input
        )
        raw = memo.lookup(query_input) if usable else None
        if raw is None:
            causal = None
            if self.cfg.attention_dir == "causal":
                n_q, n_k = query_input.shape[1], key_input.shape[1]
                causal = torch.ones(n_q, n_k, dtype=torch.bool, device=query_input.device).tril()
            raw = self._attend(query_input, key_input, value_input, causal, attention_mask)
            if usable:
                memo.store(query_input, raw)
        return self._output(self.hook_z(raw))

    def forward_at(
        self,
        query_input: Float[Tensor, "batch 1 d_model"],
        key_input: Float[Tensor, "batch pos d_model"],
        value_input: Float[Tensor, "batch pos d_model"],
        positions: Int[Tensor, " batch"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch 1 d_model"]:
        """The attention output at one query position per row (``query_input`` is the
        normalised residual there): the same numbers as :meth:`forward` at those positions.
        ``hook_q``, ``hook_attn_scores``, ``hook_pattern``, ``hook_z`` (and ``hook_result``)
        see one position per row; ``hook_k`` / ``hook_v`` every position."""
        at = positions.to(query_input.device)
        causal = None
        if self.cfg.attention_dir == "causal":
            keys = torch.arange(key_input.shape[1], device=at.device)
            causal = (keys[None, :] <= at[:, None])[:, None, None, :]  # [b, 1, 1, k]
        raw = self._attend(query_input, key_input, value_input, causal, attention_mask)
        return self._output(self.hook_z(raw))

    def _output(
        self, z: Float[Tensor, "batch pos head d_head"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The heads' outputs through ``W_O`` (each through ``hook_result`` when
        ``use_attn_result``), summed, plus ``b_O``."""
        if self.cfg.use_attn_result:
            result = self.hook_result(torch.einsum("bphe,hed->bphd", z, self.W_O))
            return result.sum(-2) + self.b_O
        w_o = self.W_O.reshape(-1, self.W_O.shape[-1]).T.contiguous()  # [d_model, head*d_head]
        return F.linear(z.reshape(z.shape[0], z.shape[1], -1), w_o, self.b_O)

    def _attend(
        self,
        query_input: Float[Tensor, "batch q_pos d_model"],
        key_input: Float[Tensor, "batch pos d_model"],
        value_input: Float[Tensor, "batch pos d_model"],
        causal: Bool[Tensor, "... q_pos pos"] | None,
        attention_mask: Int[Tensor, "batch pos"] | None,
    ) -> Float[Tensor, "batch q_pos head d_head"]:
        """Projections, scores (keys outside ``causal`` or ``attention_mask`` get -inf),
        pattern and the weighted values, with the q, k, v, score and pattern hooks."""
        q = self.hook_q(self._project(query_input, self.W_Q, self.b_Q))
        k = self.hook_k(self._project(key_input, self.W_K, self.b_K))
        v = self.hook_v(self._project(value_input, self.W_V, self.b_V))
        scores = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) / self.attn_scale
        keep = causal
        if attention_mask is not None:
            keys = attention_mask.bool().to(scores.device)[:, None, None, :]
            keep = keys if keep is None else keep & keys
        if keep is not None:
            scores = torch.where(keep, scores, self.IGNORE)
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(cpu_kernels.attention_pattern(scores)).to(v.dtype)
        return (pattern @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


class MLP(nn.Module):
    """``W_in`` ``[d_model, d_mlp]``, activation, ``W_out`` ``[d_mlp, d_model]``."""

    def __init__(self, cfg: NativeConfig) -> None:
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp
        self.W_in = nn.Parameter(torch.empty(d, m, dtype=cfg.dtype))
        self.b_in = nn.Parameter(torch.zeros(m, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(m, d, dtype=cfg.dtype))
        self.b_out = nn.Parameter(torch.zeros(d, dtype=cfg.dtype))
        self.act = _ACT[cfg.act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        lead = x.shape[:-1]
        pre = torch.addmm(self.b_in, x.reshape(-1, x.shape[-1]), self.W_in)
        post = self.hook_post(self.act(self.hook_pre(pre.view(*lead, -1))))
        out = torch.addmm(self.b_out, post.reshape(-1, post.shape[-1]), self.W_out)
        return out.view(*lead, -1)


class Block(nn.Module):
    """A pre-norm transformer block (attention, then MLP unless ``attn_only``)."""

    def __init__(self, cfg: NativeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = _norm(cfg)
        if not cfg.attn_only:
            self.ln2 = _norm(cfg)
        self.attn = Attention(cfg)
        if not cfg.attn_only:
            self.mlp = MLP(cfg)
            self.hook_mlp_in = HookPoint()  # [batch, pos, d_model] (use_hook_mlp_in only)
            self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        # three normalisations of one input, as TransformerLens 3.9 computes them: the
        # gradient then sums the same three terms in the same order (bitwise-equal training)
        ln1 = self.ln1
        if torch.is_grad_enabled():
            attn_out = self.attn(ln1(resid_pre), ln1(resid_pre), ln1(resid_pre), attention_mask)
        else:  # no gradient: one normalisation gives the same three tensors, bit for bit
            x = ln1(resid_pre)
            attn_out = self.attn(x, x, x, attention_mask)
        return self._after_attention(resid_pre, attn_out)

    def _after_attention(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        attn_out: Float[Tensor, "batch pos d_model"],
    ) -> Float[Tensor, "batch pos d_model"]:
        """The rest of the block from the attention output: the residual sums and the MLP,
        with their hooks (:meth:`forward` and :meth:`forward_at` share it)."""
        attn_out = self.hook_attn_out(attn_out)
        if self.cfg.attn_only:
            return self.hook_resid_post(resid + attn_out)
        resid_mid = self.hook_resid_mid(resid + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def forward_at(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        positions: Int[Tensor, " batch"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch 1 d_model"]:
        """The block's output at one position per row: :meth:`forward`'s numbers there, with
        the queries, the MLP and every hook after the keys and values computed at those
        positions only (``hook_resid_pre``, ``hook_k``, ``hook_v`` see every position, the
        block's other hooks one per row)."""
        resid_pre = self.hook_resid_pre(resid_pre)
        rows = torch.arange(resid_pre.shape[0], device=resid_pre.device)
        at = positions.to(resid_pre.device)
        x = self.ln1(resid_pre)  # one normalisation serves queries, keys and values
        attn_out = self.attn.forward_at(x[rows, at][:, None], x, x, at, attention_mask)
        return self._after_attention(resid_pre[rows, at][:, None], attn_out)


class _Embed(nn.Module):
    def __init__(self, cfg: NativeConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens, :]


class _PosEmbed(nn.Module):
    def __init__(self, cfg: NativeConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))

    def forward(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None
    ) -> Float[Tensor, "batch pos d_model"]:
        n, pos = tokens.shape
        if attention_mask is None:
            return self.W_pos[:pos].unsqueeze(0).expand(n, -1, -1).clone()
        # left padding: positions count real tokens only; padded positions get no embedding
        real = attention_mask.bool()
        ids = (real.long().cumsum(-1) - 1).clamp(min=0)
        return torch.where(real[..., None], self.W_pos[ids], 0.0)


class _Unembed(nn.Module):
    def __init__(self, cfg: NativeConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out, dtype=cfg.dtype))
        self.hook_in = HookPoint()  # [batch, pos, d_model]
        self.hook_out = HookPoint()  # [batch, pos, d_vocab_out]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.hook_out(F.linear(self.hook_in(x), self.W_U.T.contiguous(), self.b_U))


class NativeTransformer(HookedRootModule):
    """A hooked transformer with TransformerLens 3.9 ``HookedTransformer``'s interface.

    ``model(tokens)`` gives logits ``[batch, pos, d_vocab]``; ``stop_at_layer=k`` returns the
    residual entering block ``k`` (``k = n_layers``: the final residual, before ``ln_final``);
    ``start_at_layer=k`` takes that residual as input. ``attention_mask`` (``[batch, pos]``,
    1 = real token) masks padded keys and, as in TransformerLens, counts positions over real
    tokens (left padding). ``run_with_hooks``, ``run_with_cache``, ``hooks()`` and
    ``transformer_lens.patching`` work as for ``HookedTransformer``.
    """

    def __init__(self, cfg: NativeConfig | dict[str, Any], move_to_device: bool = True) -> None:
        super().__init__()
        if isinstance(cfg, dict):
            cfg = NativeConfig.from_dict(cfg)
        if not isinstance(cfg, NativeConfig):
            raise ValueError(f"cfg must be a NativeConfig or a dict, got {type(cfg).__name__}")
        self.cfg = cfg
        if cfg.seed is not None:  # as TransformerLens: seeds every generator
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
        self.embed = _Embed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.pos_embed = _PosEmbed(cfg)
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = _norm(cfg) if cfg.normalization_type else None
        self.unembed = _Unembed(cfg)
        if cfg.init_weights:
            self.init_weights()
        if move_to_device and cfg.device != "cpu":
            self.to(cfg.device)
        self.setup()

    @contextmanager
    def prefix_memo(self) -> Iterator[PrefixMemo]:
        """Within the block, no-grad forward passes reuse the first attention layer's ``z``
        (before ``hook_z``) for inputs seen before (:class:`PrefixMemo`: bit for bit the same
        numbers, the layer's projections, scores and softmax skipped). Yields the memo, which
        the caller clears whenever the hooks before ``blocks.0.attn.hook_z`` change."""
        if not len(self.blocks):
            yield PrefixMemo()
            return
        attn = self.blocks[0].attn
        memo, before = PrefixMemo(), attn.prefix_memo
        attn.prefix_memo = memo
        try:
            yield memo
        finally:
            attn.prefix_memo = before

    def init_weights(self) -> None:
        """GPT-2 initialisation: each ``W_*`` from N(0, initializer_range), in creation order."""
        for name, param in self.named_parameters():
            if "W_" in name:
                nn.init.normal_(param, std=self.cfg.initializer_range)

    def to(self, *args: Any, print_details: bool = True, **kwargs: Any) -> NativeTransformer:
        """``nn.Module.to`` that keeps ``cfg.device`` in step (``print_details`` is accepted and
        ignored, as a drop-in for ``HookedTransformer.to``)."""
        out = super().to(*args, **kwargs)
        param = next(self.parameters(), None)
        if param is not None:
            self.cfg.device = str(param.device)
        return out

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding matrix."""
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding matrix."""
        return self.unembed.W_U

    def forward(
        self,
        input: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Any:
        """Run the model: logits, the loss (``return_type="loss"``), None, or a residual."""
        if isinstance(input, (str, list)):
            raise ValueError("NativeTransformer takes token ids (it has no tokenizer)")
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"unknown return_type {return_type!r}")
        if start_at_layer is None:
            tokens = input if input.ndim == 2 else input[None]
            if tokens.shape[-1] > self.cfg.n_ctx:
                raise ValueError(f"sequence of {tokens.shape[-1]} tokens > n_ctx {self.cfg.n_ctx}")
            device = self.embed.W_E.device
            tokens = tokens.to(device)
            if attention_mask is not None:
                attention_mask = attention_mask.to(device)
            embed = self.hook_embed(self.embed(tokens))
            residual = embed + self.hook_pos_embed(self.pos_embed(tokens, attention_mask))
            start_at_layer = 0
        else:
            residual = input
        for block in list(self.blocks)[start_at_layer:stop_at_layer]:
            residual = block(residual, attention_mask)
        if stop_at_layer is not None:
            return residual
        if self.ln_final is not None:
            residual = self.ln_final(residual)
        if return_type is None:
            return None
        logits = self.unembed(residual)
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("return_type 'loss' needs tokens")
        loss = next_token_loss(logits, tokens, attention_mask, loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def readout_residual(
        self,
        tokens: Int[Tensor, "batch pos"],
        positions: Int[Tensor, " batch"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch d_model"]:
        """The final residual after ``ln_final`` at one position per row (e.g. the last real
        token, the ``"last"`` readout): the numbers of ``model(tokens, stop_at_layer=n_layers)``
        followed by ``ln_final`` at those positions, with the last block's queries and MLP
        computed there only (:meth:`Block.forward_at`: its hooks after the keys and values see
        one position per row). Nothing after the last block reads the other positions, so the
        output is the same, within float rounding of the smaller products."""
        if not len(self.blocks):
            raise ValueError("readout_residual needs at least one block")
        residual = self(tokens, stop_at_layer=self.cfg.n_layers - 1, attention_mask=attention_mask)
        if attention_mask is not None:
            attention_mask = attention_mask.to(residual.device)
        out = self.blocks[-1].forward_at(residual, positions, attention_mask)
        if self.ln_final is not None:
            out = self.ln_final(out)
        return out[:, 0]

    def readout_hook_names(self) -> frozenset[str]:
        """The hooks that see one position per row in :meth:`readout_residual`: the last
        block's, except ``hook_resid_pre``, ``attn.hook_k`` and ``attn.hook_v``."""
        last = f"blocks.{self.cfg.n_layers - 1}."
        full = {f"{last}hook_resid_pre", f"{last}attn.hook_k", f"{last}attn.hook_v"}
        return frozenset(n for n in self.hook_dict if n.startswith(last) and n not in full)


def next_token_loss(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_1"]:
    """Next-token cross-entropy (mean over predicted tokens, or per token)."""
    logprobs = logits[:, :-1].log_softmax(-1)
    nll = -logprobs.gather(-1, tokens[:, 1:, None].to(logits.device)).squeeze(-1)
    if attention_mask is not None:
        keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool().to(nll.device)
        if per_token:
            return nll * keep
        return nll[keep].mean()
    return nll if per_token else nll.mean()
