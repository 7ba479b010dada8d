"""Exact fast path for per-position activation patching of attention heads.

Patching the output ``z`` of head ``h`` at position ``p`` of layer ``l`` (clean into corrupted)
changes, in a causal pre-LN transformer, only

* at layer ``l``: the attention output, hence the residual stream, at position ``p`` (``z`` of
  every other position is untouched), so only ``W_O`` of the patched ``z`` and the MLP at ``p``
  are recomputed;
* at layers ``> l``: positions ``>= p`` (positions ``< p`` never see ``p``). Their keys and values
  at positions ``< p`` are the corrupted run's, taken from its cache.

When the metric reads only the last position (checked by probing it, see
:func:`metric_reads_last_position`), the final layer computes keys/values for positions ``>= p``
but the query, attention output, MLP, ``ln_final`` and unembedding only at the last position.
Otherwise the full logits are assembled from the corrupted run's logits at positions ``< p`` and
the recomputed ones at ``>= p``. Both modes give the same numbers as a full forward pass (up to
float rounding). In the ``positions`` layout all heads of one layer at one position form one
batched suffix computation (``heads x batch`` rows), chunked by ``chunk_rows``; the ``packed``
layout (:mod:`subroutine_circuits.patching.fast_packed`) computes the same suffix tokens of
many positions in one run (few, large kernel launches: the GPU default). Patches whose clean
and corrupted ``z`` are bitwise equal (e.g. before the first differing token) leave the run
unchanged and can be skipped. :data:`FAST_VARIANTS` names the combinations;
:data:`AUTO_VARIANTS` is the choice per device type.

The hand-written attention covers the standard TransformerLens ``HookedTransformer`` block only;
:func:`fast_path_unsupported` lists what it does not cover, and the caller
(:func:`subroutine_circuits.patching.activation.activation_patching`) falls back to the generic
path then. Layer norms, MLPs, ``ln_final`` and ``unembed`` are the model's own modules (they act
position-wise), so their numerics are TransformerLens' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from subroutine_circuits.patching.fast_packed import identical_patches, packed_scores

#: ``normalization_type`` values of the blocks the fast path supports (position-wise norms).
SUPPORTED_NORMS = ("LN", "LNPre", "RMS", "RMSPre")
#: MLP activation functions the fast path supports (the model's own MLP module is called).
SUPPORTED_ACTS = ("gelu", "relu", "gelu_new", "gelu_fast", "silu")

# config attributes that must keep their default value (name, default) for the fast path
_DEFAULT_FLAGS = (
    ("attn_only", False),
    ("parallel_attn_mlp", False),
    ("gated_mlp", False),
    ("num_experts", None),
    ("use_split_qkv_input", False),
    ("use_attn_in", False),
    ("n_key_value_heads", None),
    ("use_local_attn", False),
    ("use_qk_norm", False),
    ("clip_qkv", None),
    ("use_logn_attn", False),
    ("use_attention_sinks", False),
    ("use_normalization_before_and_after", False),
    ("load_in_4bit", False),
)


def _has_hooks(model) -> bool:
    """Whether any module of ``model`` has a forward (pre-)hook the fast path would bypass."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def fast_path_unsupported(model, groups: Sequence, per_position: bool, readout) -> str | None:
    """Why the fast path cannot run this request, or ``None`` if it can.

    Supported: a causal ``HookedTransformer`` with standard positional embeddings, pre-LN blocks
    (``LN``/``LNPre``/``RMS``/``RMSPre``), standard multi-head attention, a non-gated MLP, no
    soft-caps, no hooks on the model; only head groups (``hook_z``), ``per_position=True``, and
    the ``logits`` or ``hidden_last`` readout.
    """
    from subroutine_circuits.adapters.transformer_lens import hidden_last_readout, logits_readout

    cfg = model.cfg
    if type(model).__name__ not in ("HookedTransformer", "NativeTransformer"):
        return f"model type {type(model).__name__} (only HookedTransformer / NativeTransformer)"
    if not per_position:
        return "per_position=False"
    if any(g.kind != "head" for g in groups):
        return "groups other than heads"
    if readout is not logits_readout and readout is not hidden_last_readout:
        return "readout other than 'logits' / 'hidden_last'"
    if getattr(cfg, "attention_dir", "causal") != "causal":
        return f"attention_dir={cfg.attention_dir!r}"
    if any(
        getattr(b.attn, "_attention_dir_override", None) not in (None, "causal")
        for b in model.blocks
    ):
        return "a block overrides the attention direction"
    if getattr(cfg, "positional_embedding_type", "standard") != "standard":
        return f"positional_embedding_type={cfg.positional_embedding_type!r}"
    if cfg.normalization_type not in SUPPORTED_NORMS:
        return f"normalization_type={cfg.normalization_type!r}"
    if cfg.act_fn not in SUPPORTED_ACTS:
        return f"act_fn={cfg.act_fn!r}"
    for name, default in _DEFAULT_FLAGS:
        if getattr(cfg, name, default) != default:
            return f"{name}={getattr(cfg, name)!r}"
    for name in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if getattr(cfg, name, -1.0) > 0:
            return f"{name}={getattr(cfg, name)!r}"
    try:
        from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover - older TransformerLens
        POST_NORM_ARCHITECTURES = ()
    if getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES:
        return f"post-norm architecture {cfg.original_architecture!r}"
    if _has_hooks(model):
        return "hooks on the model"
    return None


def metric_reads_last_position(metric, logits: Float[Tensor, "batch pos d_vocab"]) -> bool:
    """Probe whether ``metric`` depends on the logits of the last position only.

    True when the metric gives bitwise the same values (a) on the last position alone
    (``logits[:, -1:]``, so the fast path may hand it ``[..., batch, 1, d_vocab]``) and (b) on
    logits whose other positions are replaced by random values. Any error means False (the
    caller then assembles full logits, which is exact for every metric).
    """
    try:
        ref = metric(logits)
        last = metric(logits[:, -1:])
        g = torch.Generator().manual_seed(1234)
        noisy = logits.clone()
        rand = torch.randn(noisy[:, :-1].shape, generator=g) * 10.0
        noisy[:, :-1] = rand.to(device=logits.device, dtype=logits.dtype)
        pert = metric(noisy)
    except Exception:  # noqa: BLE001 - any failure only disables the shortcut
        return False
    if not all(isinstance(t, Tensor) for t in (ref, last, pert)):
        return False
    return torch.equal(ref, last) and torch.equal(ref, pert)


def _expand_rows(x: Tensor, k: int) -> Tensor:
    """``[batch, ...] -> [k * batch, ...]`` (copy ``i`` at rows ``i*batch:(i+1)*batch``)."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


def _qkv_linear(
    x: Float[Tensor, "n pos d_model"],
    w: Float[Tensor, "head d_model d_head"],
    b: Float[Tensor, "head d_head"],
) -> Float[Tensor, "n pos head d_head"]:
    """The query/key/value projection, computed as TransformerLens does (one ``F.linear``)."""
    n_heads, d_model, d_head = w.shape
    w_flat = w.permute(0, 2, 1).reshape(n_heads * d_head, d_model)
    return F.linear(x, w_flat, b.reshape(-1)).reshape(x.shape[0], x.shape[1], n_heads, d_head)


def _out_linear(attn, z: Float[Tensor, "n pos head d_head"]) -> Float[Tensor, "n pos d_model"]:
    """``z @ W_O + b_O`` summed over heads (one ``F.linear``, as TransformerLens)."""
    n_heads, d_head, d_model = attn.W_O.shape
    w = attn.W_O.reshape(n_heads * d_head, d_model).t()
    return F.linear(z.reshape(z.shape[0], z.shape[1], n_heads * d_head), w, attn.b_O)


def _suffix_block(
    block,
    x: Float[Tensor, "n s d_model"],
    cache_q: Float[Tensor, "n pos head d_head"],
    cache_k: Float[Tensor, "n pos head d_head"],
    cache_v: Float[Tensor, "n pos head d_head"],
    last_only: bool,
    tail_from_cache: bool,
) -> Float[Tensor, "n s_out d_model"]:
    """One transformer block on the suffix positions ``p..pos-1`` of a residual stream.

    ``x`` holds the residual stream at positions ``p = pos - s ..`` of ``n`` rows;
    ``cache_q/k/v`` are the corrupted run's queries, keys and values of this block, repeated to
    the ``n`` rows; keys and values of positions ``< p`` are taken from them. With ``last_only``
    the query, attention output and MLP are computed only at the last position (``s_out = 1``);
    otherwise at all suffix positions (``s_out = s``).

    ``tail_from_cache`` may be set when only position ``p`` of ``x`` differs from the corrupted
    run (the block right after the patched layer): ``ln1`` and the projections then run at
    position ``p`` only, and ``q``/``k``/``v`` after ``p`` come from the cache.
    """
    attn = block.attn
    n, s, _ = x.shape
    p = cache_k.shape[1] - s
    if not tail_from_cache:
        h = block.ln1(x)
        k_new = _qkv_linear(h, attn.W_K, attn.b_K)
        v_new = _qkv_linear(h, attn.W_V, attn.b_V)
        q = _qkv_linear(h[:, -1:] if last_only else h, attn.W_Q, attn.b_Q)
        keys = torch.cat([cache_k[:, :p], k_new], dim=1) if p > 0 else k_new
        values = torch.cat([cache_v[:, :p], v_new], dim=1) if p > 0 else v_new
    else:
        h = block.ln1(x[:, :1])  # only position p differs from the corrupted run
        k_p = _qkv_linear(h, attn.W_K, attn.b_K)
        v_p = _qkv_linear(h, attn.W_V, attn.b_V)
        keys = torch.cat([cache_k[:, :p], k_p, cache_k[:, p + 1 :]], dim=1)
        values = torch.cat([cache_v[:, :p], v_p, cache_v[:, p + 1 :]], dim=1)
        if last_only and s > 1:
            q = cache_q[:, -1:]
        else:
            q = torch.cat([_qkv_linear(h, attn.W_Q, attn.b_Q), cache_q[:, p + 1 :]], dim=1)
    # [n, head, sq, d_head] @ [n, head, d_head, key] -> [n, head, sq, key]
    scores = q.permute(0, 2, 1, 3) @ keys.permute(0, 2, 3, 1) / attn.attn_scale
    if not last_only:
        # query i sits at absolute position p + i and sees keys 0..p + i
        mask = torch.ones(s, p + s, dtype=torch.bool, device=x.device).tril_(p)
        scores = torch.where(mask, scores, attn.IGNORE.to(scores.device))
    # every query sees at least its own key, so no row is fully masked (no NaN to clean up)
    pattern = F.softmax(scores, dim=-1)
    z = (pattern @ values.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # [n, sq, head, d_head]
    resid = x[:, -1:] if last_only else x
    resid_mid = resid + _out_linear(attn, z)
    return resid_mid + block.mlp(block.ln2(resid_mid))


def _patched_suffix(
    model,
    layer: int,
    p: int,
    heads: Tensor,
    z_clean: Float[Tensor, "batch pos head d_head"],
    z_corr: Float[Tensor, "batch pos head d_head"],
    corr_resids: list[Tensor],
    expanded,
    corr_out: Tensor,
    last_only: bool,
    hidden: bool,
) -> Tensor:
    """The readout of ``k = len(heads)`` corrupted runs, copy ``i`` with head ``heads[i]`` of
    ``layer`` patched to its clean value at position ``p``: ``[k, batch, ...]``.

    Layer ``layer`` changes only at position ``p`` (attention output, then the MLP); later
    layers run on positions ``>= p`` with the corrupted keys/values before ``p``
    (``expanded(m, kind, k)``); in the first of them only position ``p``'s input differs.
    """
    k, batch = len(heads), z_corr.shape[0]
    n_layers = model.cfg.n_layers
    block = model.blocks[layer]
    size = z_corr.shape[2]
    sel = heads[:, None] == torch.arange(size, device=z_corr.device)[None, :]
    z_p = torch.where(sel[:, None, :, None], z_clean[None, :, p], z_corr[None, :, p])
    resid_mid = corr_resids[layer][:, p] + _out_linear(block.attn, z_p)
    resid_post = resid_mid + block.mlp(block.ln2(resid_mid))  # [k, batch, d]
    rest = corr_resids[layer + 1][:, p + 1 :]
    x = torch.cat([resid_post.reshape(k * batch, 1, -1), _expand_rows(rest, k)], dim=1)
    for m in range(layer + 1, n_layers):
        x = _suffix_block(
            model.blocks[m],
            x,
            *(expanded(m, c, k) for c in ("q", "k", "v")),
            last_only=last_only and m == n_layers - 1,
            tail_from_cache=m == layer + 1,
        )
    if last_only:
        x = x[:, -1:]
    final = model.ln_final(x) if getattr(model, "ln_final", None) is not None else x
    if hidden:
        return final[:, -1].reshape(k, batch, -1)
    logits = model.unembed(final)
    logits = logits.reshape(k, batch, *logits.shape[1:])
    if not last_only:
        prefix = corr_out[:, :p].unsqueeze(0).expand(k, *corr_out[:, :p].shape)
        logits = torch.cat([prefix, logits], dim=2)
    return logits


@dataclass
class FastVariant:
    """How the fast path computes the patches (all variants give the same numbers).

    ``layout``: ``"packed"`` runs the patches of many positions of a layer together on packed
    suffix tokens (:mod:`subroutine_circuits.patching.fast_packed`); ``"positions"`` runs one
    suffix computation per (layer, position). ``attention``: ``"manual"`` (TransformerLens'
    formula: scores, mask, softmax) or ``"sdpa"`` (``F.scaled_dot_product_attention``, packed
    layout only). ``skip_identical``: patches whose clean and corrupted ``z`` are bitwise equal
    keep the corrupted metric without computation (the ``positions`` layout skips a position
    only when all its heads are identical).
    """

    layout: str = "packed"
    attention: str = "manual"
    skip_identical: bool = True


#: Named fast-path variants (``activation_patching(..., fast=NAME)``, the benchmark's
#: ``--variant``); ``"auto"`` picks per device (:func:`resolve_fast_variant`).
FAST_VARIANTS: dict[str, FastVariant] = {
    "packed": FastVariant(),
    "packed-sdpa": FastVariant(attention="sdpa"),
    "packed-noskip": FastVariant(skip_identical=False),
    "positions": FastVariant(layout="positions", skip_identical=False),
    "positions-skip": FastVariant(layout="positions"),
}


#: The variant ``"auto"`` picks per device type (measured with ``benchmarks/bench_patching.py
#: --sweep``, see ``docs/BENCHMARKS.md``). On one H200 at the default 4096 rows per forward,
#: ``positions-skip`` was fastest (32.9x TransformerLens; ``packed`` 27.2x); ``packed-sdpa``
#: wins only with 16384 rows (44.3x), a memory bound we leave to the user (``fast=...``).
AUTO_VARIANTS: dict[str, str] = {"cpu": "positions-skip", "cuda": "positions-skip"}


def auto_variant_name(device) -> str:
    """The name of the variant ``"auto"`` means on ``device`` (``packed`` on other types)."""
    return AUTO_VARIANTS.get(torch.device(device).type, "packed")


def resolve_fast_variant(name: str, device) -> FastVariant:
    """The :class:`FastVariant` named ``name``; ``"auto"`` is :func:`auto_variant_name`."""
    if name == "auto":
        name = auto_variant_name(device)
    if name not in FAST_VARIANTS:
        known = ", ".join(["auto", *FAST_VARIANTS])
        raise ValueError(f"unknown fast-path variant {name!r}; known: {known}")
    return FAST_VARIANTS[name]


@dataclass
class PatchRuns:
    """The clean and corrupted runs the fast path patches from (computed once)."""

    clean_acts: dict[str, Tensor]  # hook_z of the patched layers
    corr_acts: dict[str, Tensor]  # hook_z of the patched layers, hook_q/k/v of later ones
    corr_resids: list[Tensor]  # resid_pre of every layer, then the final residual
    corr_out: Tensor  # the corrupted readout
    m_clean: float
    m_corr: float
    last_only: bool  # only the last position's readout is needed
    hidden: bool  # the readout is the final hidden state (not logits)


def patch_runs(adapter, clean_tokens, corr_tokens, metric, groups, readout) -> PatchRuns:
    """Run the clean and corrupted inputs once, keeping what the fast path needs."""
    from subroutine_circuits.adapters.transformer_lens import hidden_last_readout

    n_layers = adapter.model.cfg.n_layers
    layers = sorted({g.layer for g in groups})
    z_hooks = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    kv_hooks = [
        f"blocks.{m}.attn.hook_{kind}"
        for m in range(min(layers) + 1, n_layers)
        for kind in ("q", "k", "v")
    ]
    _, clean_acts, clean_out = adapter.layer_states(clean_tokens, z_hooks, readout)
    corr_resids, corr_acts, corr_out = adapter.layer_states(
        corr_tokens, z_hooks + kv_hooks, readout
    )
    hidden = readout is hidden_last_readout
    return PatchRuns(
        clean_acts=clean_acts,
        corr_acts=corr_acts,
        corr_resids=corr_resids,
        corr_out=corr_out,
        m_clean=float(metric(clean_out).float().mean()),
        m_corr=float(metric(corr_out).float().mean()),
        last_only=hidden or metric_reads_last_position(metric, corr_out),
        hidden=hidden,
    )


@torch.no_grad()
def fast_head_patching_by_pos(
    adapter,
    clean_tokens: Int[Tensor, "batch pos"],
    corr_tokens: Int[Tensor, "batch pos"],
    metric,
    groups: Sequence,
    readout,
    chunk_rows: int = 4096,
    variant: str = "auto",
):
    """Per-position head patching on the fast path (see the module docstring).

    Same arguments and result (a :class:`~subroutine_circuits.patching.activation.PatchScores`)
    as ``activation_patching(..., per_position=True)``; the caller checks
    :func:`fast_path_unsupported` first. ``variant`` names a :data:`FAST_VARIANTS` entry (or
    ``"auto"``). ``extra["path"]`` records the mode used: ``"fast-last"`` (last position only)
    or ``"fast-suffix"`` (full logits); ``extra["variant"]`` the variant.
    """
    from subroutine_circuits.patching.scores import PatchScores

    runs = patch_runs(adapter, clean_tokens, corr_tokens, metric, groups, readout)
    batch = corr_tokens.shape[0]
    k_max = max(1, chunk_rows // batch)
    v = resolve_fast_variant(variant, corr_tokens.device)
    by_layer = sorted(groups, key=lambda g: g.layer)
    if v.layout == "packed":
        sdpa = v.attention == "sdpa"
        patched = packed_scores(
            adapter.model, runs, by_layer, metric, k_max, sdpa, v.skip_identical
        )
    else:
        patched = _per_position_scores(
            adapter.model, runs, by_layer, metric, k_max, v.skip_identical
        )
    name = variant if variant != "auto" else auto_variant_name(corr_tokens.device)
    return PatchScores(
        groups=list(groups),
        patched=patched,
        clean_metric=runs.m_clean,
        corr_metric=runs.m_corr,
        n=batch,
        method="activation",
        per_position=True,
        extra={"path": "fast-last" if runs.last_only else "fast-suffix", "variant": name},
    )


def _per_position_scores(
    model, runs: PatchRuns, groups, metric, k_max: int, skip_identical: bool
) -> dict[str, Tensor]:
    """The ``"positions"`` layout: one suffix computation per (layer, position, head chunk);
    with ``skip_identical``, positions whose heads are all identical are not computed."""
    n_layers = model.cfg.n_layers
    n_pos = runs.corr_resids[0].shape[1]
    same = identical_patches(runs, groups).all(-1).tolist() if skip_identical else None
    patched = {g.hook_name: torch.zeros(n_pos, g.size) for g in groups}
    pending: list[tuple[str, int, int, Tensor]] = []
    # corrupted q/k/v repeated for k copies, keyed by (layer, kind, k); made once, reused, and
    # dropped once no later patched layer needs them (memory ~ 3 x layers x k x batch x pos x d)
    expanded_cache: dict[tuple[int, str, int], Tensor] = {}

    def expanded(m: int, kind: str, k: int) -> Tensor:
        """The corrupted ``blocks.{m}.attn.hook_{kind}`` repeated for ``k`` copies."""
        if (m, kind, k) not in expanded_cache:
            act = runs.corr_acts[f"blocks.{m}.attn.hook_{kind}"]
            expanded_cache[(m, kind, k)] = _expand_rows(act, k)
        return expanded_cache[(m, kind, k)]

    for gi, g in enumerate(groups):
        layer = g.layer
        for key in [key for key in expanded_cache if key[0] <= layer]:
            del expanded_cache[key]
        z_corr = runs.corr_acts[f"blocks.{layer}.attn.hook_z"]
        z_clean = runs.clean_acts[f"blocks.{layer}.attn.hook_z"]
        for p in range(n_pos):
            if (runs.last_only and layer == n_layers - 1 and p < n_pos - 1) or (
                same is not None and same[gi][p]
            ):
                # the last position of the last layer never sees position p of that layer;
                # identical clean and corrupted z leave the run as it is
                patched[g.hook_name][p, :] = runs.m_corr
                continue
            for h0 in range(0, g.size, k_max):
                heads = torch.arange(h0, min(h0 + k_max, g.size), device=z_corr.device)
                out = _patched_suffix(
                    model, layer, p, heads, z_clean, z_corr, runs.corr_resids, expanded,
                    runs.corr_out, runs.last_only, runs.hidden,
                )  # fmt: skip
                # kept on the device: no synchronisation per chunk
                pending.append((g.hook_name, p, h0, metric(out).float().mean(-1)))
    if pending:
        flat = torch.cat([v for *_, v in pending]).cpu()
        i = 0
        for hook, p, h0, v in pending:
            patched[hook][p, h0 : h0 + len(v)] = flat[i : i + len(v)]
            i += len(v)
    return patched
