"""Packed variant of the fast per-position head-patching path (few, large launches).

The per-position variant of :mod:`subroutine_circuits.patching.fast_forward` runs one suffix
computation per (layer, position): ``layers x positions`` small runs of a few dozen kernels
each, so on a GPU it is bound by kernel launches. This variant runs the patches of many
positions of one layer together, without padding the position-wise work:

* every patch ``(p, h)`` of layer ``l`` gives ``batch`` *rows*; row ``r`` (patched position
  ``p_r``) needs the suffix positions ``p_r .. pos-1`` only. These *tokens* of all rows are
  packed into one ``[T, d_model]`` tensor, on which the position-wise parts of each later block
  (layer norms, the query/key/value and output projections, the MLP) run as one batch;
* attention needs each row's whole sequence: keys/values of the row are the corrupted run's
  (cached), with the recomputed tokens scattered in (``[rows, pos, head, d_head]``); queries
  are computed at the packed tokens only, attention runs on the padded ``rows x pos`` layout
  (cheap: ``pos x pos`` per row and head), and its output is gathered back at the packed tokens.

The arithmetic equals the per-position variant's (the same suffix tokens are computed), so the
results agree with a full forward pass up to float rounding. Patches whose clean and corrupted
``z`` are bitwise equal over the whole batch (e.g. positions before the first differing token:
the model is causal) leave the run unchanged; with ``skip_identical`` their score is the
corrupted metric without any computation, which is exact too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class PackedIndex:
    """Index tensors of one chunk of ``k`` patches (``R = k * batch`` rows, ``T`` tokens).

    Row ``r = i * batch + b`` is batch element ``b`` with patch ``i`` (position ``p_row[r]``,
    head ``h_row[r]``); its tokens are positions ``p_row[r] .. pos-1``, stored consecutively
    from ``first_tok[r]`` to ``last_tok[r]``.
    """

    k: int
    q_from: int  # the first patched position of the chunk (queries start there)
    b_row: Int[Tensor, " R"]
    p_row: Int[Tensor, " R"]
    h_row: Int[Tensor, " R"]
    flat_first: Int[Tensor, " R"]  # r * pos + p_row[r]: the patched token in the row layout
    src_first: Int[Tensor, " R"]  # b_row[r] * pos + p_row[r]: the same in the batch layout
    first_tok: Int[Tensor, " R"]
    last_tok: Int[Tensor, " R"]
    row_tok: Int[Tensor, " T"]
    pos_tok: Int[Tensor, " T"]
    qpos_tok: Int[Tensor, " T"]  # pos_tok - q_from
    row_ids: Int[Tensor, " R"]  # 0 .. R-1
    flat_tok: Int[Tensor, " T"]  # row * pos + position: the token in the [R * pos] layout
    src_tok: Int[Tensor, " T"]  # batch * pos + position: the token in the [batch * pos] layout


def _index_parts(items: list[tuple[int, int]], batch: int, n_pos: int) -> dict[str, Tensor]:
    """The CPU index tensors of one chunk of patches (the fields of :class:`PackedIndex`)."""
    k = len(items)
    p_item = torch.tensor([p for p, _ in items], dtype=torch.long)
    h_item = torch.tensor([h for _, h in items], dtype=torch.long)
    p_row = p_item.repeat_interleave(batch)
    b_row = torch.arange(batch).repeat(k)
    lens = n_pos - p_row
    ends = lens.cumsum(0)
    starts = ends - lens
    row_tok = torch.arange(k * batch).repeat_interleave(lens)
    pos_tok = torch.arange(int(ends[-1])) - starts[row_tok] + p_row[row_tok]
    return {
        "b_row": b_row,
        "p_row": p_row,
        "h_row": h_item.repeat_interleave(batch),
        "flat_first": torch.arange(k * batch) * n_pos + p_row,
        "src_first": b_row * n_pos + p_row,
        "first_tok": starts,
        "last_tok": ends - 1,
        "row_tok": row_tok,
        "pos_tok": pos_tok,
        "qpos_tok": pos_tok - int(p_item.min()),
        "row_ids": torch.arange(k * batch),
        "flat_tok": row_tok * n_pos + pos_tok,
        "src_tok": b_row[row_tok] * n_pos + pos_tok,
    }


def packed_indexes(
    chunks: list[list[tuple[int, int]]], batch: int, n_pos: int, device
) -> list[PackedIndex]:
    """The :class:`PackedIndex` of each chunk of patches ``[(position, head), ...]``.

    Built on the CPU and moved to ``device`` in one transfer before any work is queued (a
    transfer from pageable memory may wait for the device; one at the start costs nothing).
    """
    parts = [_index_parts(items, batch, n_pos) for items in chunks]
    if not parts:
        return []
    flat = torch.cat([t for p in parts for t in p.values()]).to(device)
    out, i = [], 0
    for items, p in zip(chunks, parts):
        fields = {}
        for name, t in p.items():
            fields[name] = flat[i : i + len(t)]
            i += len(t)
        q_from = min(pos for pos, _ in items)
        out.append(PackedIndex(k=len(items), q_from=q_from, **fields))
    return out


def _linear_heads(
    x: Float[Tensor, "*n d_model"], w: Float[Tensor, "head d_model d_head"], b
) -> Float[Tensor, "*n head d_head"]:
    """A query/key/value projection of any leading shape (one ``F.linear``, as TransformerLens)."""
    n_heads, d_model, d_head = w.shape
    w_flat = w.permute(0, 2, 1).reshape(n_heads * d_head, d_model)
    return F.linear(x, w_flat, b.reshape(-1)).unflatten(-1, (n_heads, d_head))


def _out_heads(attn, z: Float[Tensor, "*n head d_head"]) -> Float[Tensor, "*n d_model"]:
    """``z @ W_O + b_O`` summed over heads, for any leading shape (one ``F.linear``)."""
    n_heads, d_head, d_model = attn.W_O.shape
    w = attn.W_O.reshape(n_heads * d_head, d_model).t()
    return F.linear(z.flatten(-2), w, attn.b_O)


def _mlp_residual(block, resid_mid: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    """``resid_mid + mlp(ln2(resid_mid))`` with the block's own modules."""
    return resid_mid + block.mlp(block.ln2(resid_mid.unsqueeze(0))).squeeze(0)


def _rows_layout(
    cache: Float[Tensor, "batch head pos d_head"],
    ix: PackedIndex,
    new: Float[Tensor, "n head d_head"],
    rows: Int[Tensor, " n"],
    pos: Int[Tensor, " n"],
    start: int = 0,
) -> Float[Tensor, "R head s d_head"]:
    """The corrupted ``cache`` (positions ``start..``) of every row, with ``new[i]`` written at
    row ``rows[i]``, position ``start + pos[i]``."""
    out = cache[:, :, start:].index_select(0, ix.b_row)
    out[rows, :, pos] = new
    return out


#: Rows above which the SDPA variant uses the manual formula (CUDA's memory-efficient kernel
#: puts the batch on a grid axis limited to 65535 blocks).
_SDPA_MAX_ROWS = 65535


def _attend(
    attn,
    q: Float[Tensor, "R head sq d_head"],
    keys: Float[Tensor, "R head pos d_head"],
    values: Float[Tensor, "R head pos d_head"],
    q_from: int | None,
    sdpa: bool,
) -> Float[Tensor, "R head sq d_head"]:
    """Attention of the queries ``q`` over each row's keys. Query ``i`` sits at position
    ``q_from + i`` and sees keys ``<= q_from + i`` (causal); ``q_from=None``: every key."""
    sq, n = q.shape[2], keys.shape[2]
    if sdpa and q.shape[0] <= _SDPA_MAX_ROWS:
        mask = None
        if q_from is not None:
            mask = torch.ones(sq, n, dtype=torch.bool, device=q.device).tril_(q_from)
        scale = 1.0 / float(attn.attn_scale)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    scores = (q @ keys.transpose(-1, -2)).div_(attn.attn_scale)
    if q_from is not None:
        hidden = torch.ones(sq, n, dtype=torch.bool, device=q.device).triu_(q_from + 1)
        # where, not masked_fill_ with the IGNORE tensor (which may read it on the host: a sync)
        scores = torch.where(hidden, attn.IGNORE, scores)
    return F.softmax(scores, dim=-1) @ values


def packed_block(
    block,
    x: Float[Tensor, "T d_model"],
    kqv: tuple[Tensor, Tensor, Tensor],
    ix: PackedIndex,
    last_only: bool,
    sdpa: bool,
) -> Float[Tensor, "T_out d_model"]:
    """One later block on the packed suffix tokens ``x`` (``T_out = R`` with ``last_only``).

    ``kqv`` are the corrupted run's keys, queries and values of this block, heads first
    (``[batch, head, pos, d_head]``); keys/values before each row's patched position come
    from them. With ``last_only`` the query, attention output and MLP are computed at each
    row's last token only.
    """
    attn = block.attn
    cache_k, _, cache_v = kqv
    h = block.ln1(x.unsqueeze(0)).squeeze(0)
    tok = (ix.row_tok, ix.pos_tok)
    keys = _rows_layout(cache_k, ix, _linear_heads(h, attn.W_K, attn.b_K), *tok)
    values = _rows_layout(cache_v, ix, _linear_heads(h, attn.W_V, attn.b_V), *tok)
    if last_only:
        q = _linear_heads(h.index_select(0, ix.last_tok), attn.W_Q, attn.b_Q)
        z = _attend(attn, q.unsqueeze(2), keys, values, None, sdpa).squeeze(2)
        resid = x.index_select(0, ix.last_tok)
    else:
        q_tok = _linear_heads(h, attn.W_Q, attn.b_Q)
        # queries of a row before its patched position are never read: zeros suffice
        q = q_tok.new_zeros(
            keys.shape[0], keys.shape[1], keys.shape[2] - ix.q_from, q_tok.shape[-1]
        )
        q[ix.row_tok, :, ix.qpos_tok] = q_tok
        z = _attend(attn, q, keys, values, ix.q_from, sdpa)[ix.row_tok, :, ix.qpos_tok]
        resid = x
    return _mlp_residual(block, resid + _out_heads(attn, z))


def first_block_after(
    block,
    resid_p: Float[Tensor, "R d_model"],
    x: Float[Tensor, "T d_model"],
    kqv: tuple[Tensor, Tensor, Tensor],
    ix: PackedIndex,
    last_only: bool,
    sdpa: bool,
) -> Float[Tensor, "T_out d_model"]:
    """The block right after the patched layer: its input differs from the corrupted run only
    at each row's patched token (``resid_p``), so ``ln1`` and the projections run there only
    and every other query/key/value comes from the cache (heads first, as in
    :func:`packed_block`)."""
    attn = block.attn
    cache_k, cache_q, cache_v = kqv
    h = block.ln1(resid_p.unsqueeze(0)).squeeze(0)
    first = (ix.row_ids, ix.p_row)
    keys = _rows_layout(cache_k, ix, _linear_heads(h, attn.W_K, attn.b_K), *first)
    values = _rows_layout(cache_v, ix, _linear_heads(h, attn.W_V, attn.b_V), *first)
    q_p = _linear_heads(h, attn.W_Q, attn.b_Q)
    if last_only:
        n_pos = cache_q.shape[2]
        q = cache_q[:, :, -1].index_select(0, ix.b_row)
        q = torch.where((ix.p_row == n_pos - 1)[:, None, None], q_p, q)
        z = _attend(attn, q.unsqueeze(2), keys, values, None, sdpa).squeeze(2)
        resid = x.index_select(0, ix.last_tok)
    else:
        q = _rows_layout(cache_q, ix, q_p, ix.row_ids, ix.p_row - ix.q_from, ix.q_from)
        z = _attend(attn, q, keys, values, ix.q_from, sdpa)[ix.row_tok, :, ix.qpos_tok]
        resid = x
    return _mlp_residual(block, resid + _out_heads(attn, z))


def identical_patches(runs, groups) -> Tensor:
    """``[group, pos, unit]`` (CPU, bool): True where the clean and corrupted ``z`` of the unit
    are bitwise equal at that position for the whole batch, so patching it changes nothing
    (one synchronisation)."""
    return torch.stack(
        [
            (runs.clean_acts[g.hook_name] == runs.corr_acts[g.hook_name]).all(-1).all(0)
            for g in groups
        ]
    ).cpu()


def _patched_rows(
    block,
    z_clean: Float[Tensor, "batch pos head d_head"],
    z_corr: Float[Tensor, "batch pos head d_head"],
    resid_pre: Float[Tensor, "batch pos d_model"],
    ix: PackedIndex,
) -> Float[Tensor, "R d_model"]:
    """The output of the patched block at each row's patched token: ``z`` there is the
    corrupted one with head ``h_row`` clean, then ``W_O`` and the MLP (the block's attention
    output at other positions, and so its output there, is unchanged)."""
    n_heads = z_corr.shape[2]
    z_p = z_corr.flatten(0, 1).index_select(0, ix.src_first)
    clean_p = z_clean.flatten(0, 1).index_select(0, ix.src_first)
    sel = ix.h_row[:, None] == torch.arange(n_heads, device=ix.h_row.device)[None, :]
    z_p = torch.where(sel[:, :, None], clean_p, z_p)
    resid_mid = resid_pre.flatten(0, 1).index_select(0, ix.src_first) + _out_heads(block.attn, z_p)
    return _mlp_residual(block, resid_mid)


def packed_chunk(
    model, layer: int, ix: PackedIndex, runs, heads_first: dict, last_only: bool, sdpa: bool
) -> Tensor:
    """The readout of the ``ix.k`` patched corrupted runs of one chunk: ``[k, batch, ...]``.

    ``runs`` holds the clean and corrupted activations
    (:class:`~subroutine_circuits.patching.fast_forward.PatchRuns`), ``heads_first[m]`` the
    corrupted keys, queries and values of block ``m`` as ``[batch, head, pos, d_head]``. With
    ``last_only`` the logits (or hidden state) are those of the last position (``[k, batch,
    1, d_vocab]``); otherwise the full logits, the corrupted ones before each row's patched
    position.
    """
    n_layers = model.cfg.n_layers
    hook = f"blocks.{layer}.attn.hook_z"
    resid_p = _patched_rows(
        model.blocks[layer], runs.clean_acts[hook], runs.corr_acts[hook],
        runs.corr_resids[layer], ix,
    )  # fmt: skip
    if layer == n_layers - 1:  # rows at the last position only, when last_only
        x = resid_p
    else:
        x = runs.corr_resids[layer + 1].flatten(0, 1).index_select(0, ix.src_tok)
        x.index_copy_(0, ix.first_tok, resid_p)
    for m in range(layer + 1, n_layers):
        kqv = heads_first[m]
        last = last_only and m == n_layers - 1
        if m == layer + 1:
            x = first_block_after(model.blocks[m], resid_p, x, kqv, ix, last, sdpa)
        else:
            x = packed_block(model.blocks[m], x, kqv, ix, last, sdpa)
    ln_final = getattr(model, "ln_final", None)
    final = ln_final(x.unsqueeze(0)).squeeze(0) if ln_final is not None else x
    k, batch = ix.k, runs.corr_out.shape[0]
    if runs.hidden:
        return final.view(k, batch, -1)
    logits = model.unembed(final.unsqueeze(0)).squeeze(0)
    if last_only:
        return logits.view(k, batch, 1, -1)
    full = runs.corr_out.index_select(0, ix.b_row)
    at = ix.flat_first if layer == n_layers - 1 else ix.flat_tok
    full.view(-1, full.shape[-1]).index_copy_(0, at, logits)
    return full.view(k, batch, *full.shape[1:])


def packed_scores(
    model, runs, groups, metric, k_max: int, sdpa: bool, skip_identical: bool
) -> dict[str, Tensor]:
    """Per hook ``[pos, head]``: the mean metric of every (position, head) patch of ``groups``.

    Patches are chunked ``k_max`` at a time per layer (``k_max * batch`` rows). Patches that
    cannot change the readout keep the corrupted metric without computation: those of the last
    layer before the last position when only the last position is read, and (``skip_identical``)
    those whose clean and corrupted ``z`` are bitwise equal.
    """
    batch, n_pos = runs.corr_resids[0].shape[:2]
    n_layers = model.cfg.n_layers
    hooks = [g.hook_name for g in groups]
    same = identical_patches(runs, groups).tolist() if skip_identical else None
    patched = {h: torch.full((n_pos, g.size), runs.m_corr) for h, g in zip(hooks, groups)}
    plan: list[tuple[object, list[tuple[int, int]]]] = []
    for gi, g in enumerate(groups):
        items = [
            (p, h)
            for p in range(n_pos)
            if not (runs.last_only and g.layer == n_layers - 1 and p < n_pos - 1)
            for h in range(g.size)
            if same is None or not same[gi][p][h]
        ]
        plan += [(g, items[i : i + k_max]) for i in range(0, len(items), k_max)]
    indexes = packed_indexes([c for _, c in plan], batch, n_pos, runs.corr_out.device)
    first = min((g.layer for g in groups), default=n_layers) + 1
    heads_first = {
        m: tuple(
            runs.corr_acts[f"blocks.{m}.attn.hook_{c}"].transpose(1, 2).contiguous()
            for c in ("k", "q", "v")
        )
        for m in range(first, n_layers)
    }
    pending: list[tuple[str, list[tuple[int, int]], Tensor]] = []
    for (g, chunk), ix in zip(plan, indexes):
        out = packed_chunk(model, g.layer, ix, runs, heads_first, runs.last_only, sdpa)
        # kept on the device: no synchronisation per chunk
        pending.append((g.hook_name, chunk, metric(out).float().mean(-1)))
    if pending:
        flat = torch.cat([v for *_, v in pending]).cpu()  # the one synchronisation
        i = 0
        for hook, chunk, _ in pending:
            pos, heads = zip(*chunk)
            patched[hook][list(pos), list(heads)] = flat[i : i + len(chunk)]
            i += len(chunk)
    return patched
