"""Join two ``HookedTransformer`` parts side by side into one ordinary ``HookedTransformer``.

The joined model has ``d_model = d_A + d_B``, ``n_heads = n_A + n_B`` (same ``d_head``),
``d_mlp = m_A + m_B`` and block-diagonal weights with zero cross terms:

* embeddings and positional embeddings are concatenated along ``d_model``;
* head ``h < n_A`` of every layer reads and writes only residual dims ``[0, d_A)`` with A's
  weights, head ``n_A + h`` only dims ``[d_A, d_A + d_B)`` with B's weights;
* MLP neuron ``i < m_A`` reads and writes only A's dims, neuron ``m_A + i`` only B's dims;
* the unembedding is stacked (joined logits = A's logits + B's logits).

Why ``normalization_type=None``: a LayerNorm (or RMSNorm, LNPre) over the joined residual
computes one mean / scale from both blocks, so block A's normalised input would depend on block
B's activations and the join would not be exact. Without normalisation every operation of a
block is either a linear map that the block-diagonal weights keep separate, an elementwise
activation (GELU), or attention, whose scores ``q_h . k_h / sqrt(d_head)`` involve only head
``h``'s own queries and keys (read from its own block's dims). So the joined residual stream is
exactly ``[resid_A | resid_B]``, every joined head's ``hook_z`` equals the part head's, and every
joined neuron's ``hook_post`` equals the part neuron's (up to float summation order). The parts
are therefore trained without normalisation too (``planted.part_spec``). The OOO readout
L2-normalises the final embedding itself, so no ``ln_final`` is needed.

Per-block scale: ``scale_a`` multiplies everything block A writes into the residual stream
(embeddings, ``W_O``/``b_O``, ``W_out``/``b_out``) and divides everything that reads from it
(``W_Q``/``W_K``/``W_V``, ``W_in``, ``W_U``), so A's internal computation is unchanged and its
residual is exactly ``scale_a * resid_A``. It only changes how much each block weighs in the
joined readout (the cosine similarity of the concatenated final embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

#: cfg fields that must agree between the two parts.
MATCHING_FIELDS = (
    "n_layers",
    "d_head",
    "d_vocab",
    "n_ctx",
    "act_fn",
    "attention_dir",
    "positional_embedding_type",
    "use_attn_scale",
    "attn_only",
    "parallel_attn_mlp",
    "gated_mlp",
    "original_architecture",
)


@dataclass(frozen=True)
class BlockLayout:
    """Where each part lives inside a joined model (the same slices in every layer).

    ``resid``: the residual dims of block A (``[0, d_A)``) and B (``[d_A, d_A + d_B)``);
    ``heads``: head indices; ``neurons``: MLP neuron indices; ``n_layers``: layers of both.
    """

    d_a: int
    d_b: int
    n_heads_a: int
    n_heads_b: int
    d_mlp_a: int
    d_mlp_b: int
    n_layers: int

    def resid(self, block: str) -> slice:
        """Residual dims of ``block`` (``"A"`` or ``"B"``)."""
        return slice(0, self.d_a) if _block(block) == "A" else slice(self.d_a, self.d_a + self.d_b)

    def heads(self, block: str) -> range:
        """Head indices of ``block`` in every layer."""
        if _block(block) == "A":
            return range(self.n_heads_a)
        return range(self.n_heads_a, self.n_heads_a + self.n_heads_b)

    def neurons(self, block: str) -> range:
        """MLP neuron indices of ``block`` in every layer."""
        if _block(block) == "A":
            return range(self.d_mlp_a)
        return range(self.d_mlp_a, self.d_mlp_a + self.d_mlp_b)

    def units(self, block: str) -> set[tuple[int, str, int]]:
        """Every unit ``(layer, kind, index)`` of ``block`` (kinds ``"head"`` / ``"neuron"``)."""
        out: set[tuple[int, str, int]] = set()
        for layer in range(self.n_layers):
            out.update((layer, "head", h) for h in self.heads(block))
            out.update((layer, "neuron", n) for n in self.neurons(block))
        return out

    def to_dict(self) -> dict[str, int]:
        """JSON-able dict."""
        return dict(self.__dict__)


def _block(block: str) -> str:
    if block not in ("A", "B"):
        raise ValueError(f"block must be 'A' or 'B', got {block!r}")
    return block


def check_joinable(model_a: Any, model_b: Any) -> None:
    """Raise ``ValueError`` naming the first reason the two parts cannot be joined exactly."""
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if type(m).__name__ not in ("HookedTransformer", "NativeTransformer"):
            raise ValueError(f"{name} must be a HookedTransformer, got {type(m).__name__}")
        cfg = m.cfg
        if cfg.normalization_type is not None:
            raise ValueError(
                f"{name} has normalization_type={cfg.normalization_type!r}: a norm over the "
                "joined residual would mix the two blocks; train the parts with "
                "normalization_type=None"
            )
        if cfg.positional_embedding_type != "standard":
            raise ValueError(
                f"{name} has positional_embedding_type={cfg.positional_embedding_type!r}; "
                "only 'standard' (learned) positional embeddings are supported"
            )
        if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads):
            raise ValueError(f"{name} uses grouped-query attention, which is not supported")
        if cfg.attn_only or cfg.gated_mlp or cfg.parallel_attn_mlp:
            raise ValueError(
                f"{name}: only standard attention + (non-gated) MLP blocks are supported"
            )
    for f in MATCHING_FIELDS:
        va, vb = getattr(model_a.cfg, f, None), getattr(model_b.cfg, f, None)
        if va != vb:
            raise ValueError(f"cannot join: cfg.{f} differs between the parts ({va!r} vs {vb!r})")


def layout_of(model_a: Any, model_b: Any) -> BlockLayout:
    """The :class:`BlockLayout` of ``join_models(model_a, model_b)``."""
    ca, cb = model_a.cfg, model_b.cfg
    return BlockLayout(
        d_a=int(ca.d_model),
        d_b=int(cb.d_model),
        n_heads_a=int(ca.n_heads),
        n_heads_b=int(cb.n_heads),
        d_mlp_a=int(ca.d_mlp),
        d_mlp_b=int(cb.d_mlp),
        n_layers=int(ca.n_layers),
    )


def _cat_block_diag(
    a: Float[Tensor, "r_a c_a"], b: Float[Tensor, "r_b c_b"]
) -> Float[Tensor, "r c"]:
    """``[[a, 0], [0, b]]`` (2-d)."""
    return torch.block_diag(a, b)


@torch.no_grad()
def joined_state_dict(
    model_a: Any, model_b: Any, scale_a: float = 1.0, scale_b: float = 1.0
) -> dict[str, Tensor]:
    """The parameters of the joined model (see the module docstring), keyed like TL's."""
    if not (scale_a > 0 and scale_b > 0):
        raise ValueError(f"block scales must be > 0, got scale_a={scale_a}, scale_b={scale_b}")
    sa = {k: v.detach().cpu() for k, v in model_a.state_dict().items()}
    sb = {k: v.detach().cpu() for k, v in model_b.state_dict().items()}
    out: dict[str, Tensor] = {}

    def cat_writes(key: str, dim: int = -1) -> None:  # tensors that write into the residual
        out[key] = torch.cat([sa[key] * scale_a, sb[key] * scale_b], dim=dim)

    cat_writes("embed.W_E")  # [d_vocab, d_model]
    cat_writes("pos_embed.W_pos")  # [n_ctx, d_model]
    for layer in range(model_a.cfg.n_layers):
        p = f"blocks.{layer}"
        # attention: W_Q/K/V [head, d_model, d_head] read the residual (block-diagonal in
        # (head, d_model)); biases [head, d_head] concatenate over heads.
        for w in ("W_Q", "W_K", "W_V"):
            wa, wb = sa[f"{p}.attn.{w}"] / scale_a, sb[f"{p}.attn.{w}"] / scale_b
            ha, hb = wa.shape[0], wb.shape[0]
            top = torch.cat([wa, wa.new_zeros(ha, wb.shape[1], wa.shape[2])], dim=1)
            bot = torch.cat([wb.new_zeros(hb, wa.shape[1], wb.shape[2]), wb], dim=1)
            out[f"{p}.attn.{w}"] = torch.cat([top, bot], dim=0)
        for b in ("b_Q", "b_K", "b_V"):
            out[f"{p}.attn.{b}"] = torch.cat([sa[f"{p}.attn.{b}"], sb[f"{p}.attn.{b}"]], dim=0)
        # W_O [head, d_head, d_model] writes into the head's own block.
        wa, wb = sa[f"{p}.attn.W_O"] * scale_a, sb[f"{p}.attn.W_O"] * scale_b
        top = torch.cat([wa, wa.new_zeros(wa.shape[0], wa.shape[1], wb.shape[2])], dim=2)
        bot = torch.cat([wb.new_zeros(wb.shape[0], wb.shape[1], wa.shape[2]), wb], dim=2)
        out[f"{p}.attn.W_O"] = torch.cat([top, bot], dim=0)
        cat_writes(f"{p}.attn.b_O")
        # MLP: W_in [d_model, d_mlp], W_out [d_mlp, d_model].
        out[f"{p}.mlp.W_in"] = _cat_block_diag(
            sa[f"{p}.mlp.W_in"] / scale_a, sb[f"{p}.mlp.W_in"] / scale_b
        )
        out[f"{p}.mlp.b_in"] = torch.cat([sa[f"{p}.mlp.b_in"], sb[f"{p}.mlp.b_in"]])
        out[f"{p}.mlp.W_out"] = _cat_block_diag(
            sa[f"{p}.mlp.W_out"] * scale_a, sb[f"{p}.mlp.W_out"] * scale_b
        )
        cat_writes(f"{p}.mlp.b_out")
    # unembed: W_U [d_model, d_vocab] stacked, so joined logits = logits_A + logits_B.
    out["unembed.W_U"] = torch.cat(
        [sa["unembed.W_U"] / scale_a, sb["unembed.W_U"] / scale_b], dim=0
    )
    out["unembed.b_U"] = sa["unembed.b_U"] + sb["unembed.b_U"]
    return out


def joined_spec(model_a: Any, model_b: Any):
    """The ``ModelSpec`` of the joined model (``make_model(joined_spec(a, b), ...)``)."""
    from subroutine_circuits.models import ModelSpec
    from subroutine_circuits.models.presets import POOL_ATTR

    check_joinable(model_a, model_b)
    lay = layout_of(model_a, model_b)
    ca = model_a.cfg
    return ModelSpec(
        "tiny",
        attention=ca.attention_dir,
        n_ctx=int(ca.n_ctx),
        pool=getattr(model_a, POOL_ATTR, "last"),
        n_layers=int(ca.n_layers),
        d_model=lay.d_a + lay.d_b,
        n_heads=lay.n_heads_a + lay.n_heads_b,
        d_head=int(ca.d_head),
        d_mlp=lay.d_mlp_a + lay.d_mlp_b,
        act_fn=ca.act_fn,
        normalization_type=None,
    )


@torch.no_grad()
def join_models(model_a: Any, model_b: Any, scale_a: float = 1.0, scale_b: float = 1.0) -> Any:
    """One ordinary ``HookedTransformer`` running ``model_a`` and ``model_b`` side by side.

    See the module docstring for the layout and why it is exact. The parts must share
    ``n_layers``, ``d_head``, vocabulary, ``n_ctx``, activation and attention direction and
    have ``normalization_type=None``; anything else raises ``ValueError``. The parts are not
    modified. The joined model is built by ``models.make_model`` (so it carries ``sc_pool``
    and round-trips through ``save_checkpoint`` / ``load_checkpoint``) and returned in eval
    mode on the CPU.
    """
    from subroutine_circuits.models import make_model

    spec = joined_spec(model_a, model_b)
    model = make_model(spec, vocab_size=int(model_a.cfg.d_vocab), seed=0)
    dtype = model_a.embed.W_E.dtype
    if model.embed.W_E.dtype != dtype:  # e.g. float64 parts (exactness tests)
        model.to(dtype, print_details=False)
    new = joined_state_dict(model_a, model_b, scale_a, scale_b)
    state = model.state_dict()
    missing = [k for k in state if k not in new and state[k].dtype.is_floating_point]
    missing = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]
    if missing:
        raise ValueError(f"cannot join: no joined value for parameter(s) {missing[:3]}")
    for k, v in new.items():
        if k not in state:
            raise ValueError(f"cannot join: the joined model has no parameter {k!r}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"cannot join: {k} has shape {tuple(v.shape)}, expected {tuple(state[k].shape)}"
            )
        state[k] = v.to(state[k].dtype)
    model.load_state_dict(state)
    model.eval()
    return model
