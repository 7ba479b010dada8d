"""Batched activation patching over heads and MLP neurons.

Convention (the same as ``transformer_lens.patching``): the model runs on the *corrupted*
input and one unit at a time receives its activation from the *clean* run ("denoising").
The score of a unit is the mean over the batch of a per-example metric of the patched run; the
normalised score is ``(m_patched - m_corr) / (m_clean - m_corr)``.

Speed: units of layer ``l`` only change layers ``>= l``. The corrupted run is done once and its
``resid_pre`` of every layer is kept; the suffix from layer ``l`` then runs on a batch expanded
``k`` times in which copy ``i`` patches unit ``i`` (chunked to bound memory).

Units follow the unit-map conventions of :mod:`subroutine_circuits.masks`: heads are axis 2 of
``blocks.{l}.attn.hook_z`` (``[batch, pos, head, d_head]``), neurons axis 2 of
``blocks.{l}.mlp.hook_post`` (``[batch, pos, d_mlp]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

HEAD_HOOK = "blocks.{layer}.attn.hook_z"
NEURON_HOOK = "blocks.{layer}.mlp.hook_post"

#: A per-example metric: maps the readout output with leading dims ``[..., batch]`` (e.g. logits
#: ``[..., batch, pos, d_vocab]``) to ``[..., batch]``. Leading dims are copies of the batch.
Metric = Callable[[Tensor], Tensor]
#: A readout: maps ``(model, final residual [n, pos, d_model])`` to the metric's input.
Readout = Callable[[object, Tensor], Tensor]


@dataclass(frozen=True)
class Group:
    """One block of units: ``size`` units along axis 2 of ``hook_name`` in ``layer``."""

    hook_name: str
    layer: int
    kind: str  # "head" or "neuron"
    size: int


def unit_groups(
    model,
    unit_map=None,
    kinds: Sequence[str] = ("head", "neuron"),
    layers: Sequence[int] | None = None,
) -> list[Group]:
    """The unit groups to patch, in unit-map order.

    With ``unit_map`` (a :class:`subroutine_circuits.masks.UnitMap` or any object with
    ``groups`` whose items have ``hook_name``, ``layer``, ``kind``, ``size``) its order is kept,
    so flat score vectors line up with mask vectors. Without it: per layer, heads then neurons.
    """
    if unit_map is not None:
        groups = [
            Group(g.hook_name, int(g.layer), str(g.kind), int(g.size)) for g in unit_map.groups
        ]
    else:
        bad = [k for k in kinds if k not in ("head", "neuron")]
        if bad:
            raise ValueError(f"unknown unit kind(s) {bad}; patching supports 'head' and 'neuron'")
        n_layers = model.cfg.n_layers
        layers = list(range(n_layers)) if layers is None else list(layers)
        groups = []
        for layer in layers:
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model")
            if "head" in kinds:
                groups.append(
                    Group(HEAD_HOOK.format(layer=layer), layer, "head", model.cfg.n_heads)
                )
            if "neuron" in kinds and not model.cfg.attn_only:
                groups.append(
                    Group(NEURON_HOOK.format(layer=layer), layer, "neuron", model.cfg.d_mlp)
                )
    hook_dict = model.hook_dict
    for g in groups:
        if g.kind not in ("head", "neuron"):
            raise ValueError(f"unit kind {g.kind!r} of {g.hook_name} cannot be patched here")
        if g.hook_name not in hook_dict:
            raise ValueError(f"unknown hook {g.hook_name!r} for this model")
    if not groups:
        raise ValueError("no units to patch (empty unit groups)")
    return groups


def n_units(groups: Sequence[Group]) -> int:
    """Total number of units in ``groups``."""
    return sum(g.size for g in groups)


# ----------------------------------------------------------------------------- readouts


def logits_readout(model, resid: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n pos d_vocab"]:
    """The model's logits from its final residual stream (ln_final, unembed, soft-cap)."""
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


def get_readout(readout: str | Readout) -> Readout:
    """Resolve a readout name (``logits``, ``hidden_last``, ``hidden_mean``) or pass a callable."""
    if callable(readout):
        return readout
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; choose one of {sorted(READOUTS)}")
    return READOUTS[readout]


# ----------------------------------------------------------------------------- forward helpers


def _check_model(model) -> None:
    if getattr(model.cfg, "positional_embedding_type", "standard") == "shortformer":
        raise ValueError("shortformer positional embeddings are not supported by patching")
    if not hasattr(model, "blocks") or not hasattr(model, "cfg"):
        raise ValueError("patching needs a TransformerLens model with .blocks and .cfg")
    if type(model).__name__ == "HookedEncoder":
        raise ValueError(
            "patching runs HookedTransformer models (causal or bidirectional); HookedEncoder "
            "cannot start a forward pass at a layer"
        )


def _check_tokens(clean: Tensor, corr: Tensor) -> None:
    if clean.ndim != 2 or corr.ndim != 2:
        raise ValueError(
            f"tokens must be [batch, pos]; got {tuple(clean.shape)}, {tuple(corr.shape)}"
        )
    if clean.shape != corr.shape:
        raise ValueError(
            f"clean and corrupted tokens differ in shape: {tuple(clean.shape)} vs "
            f"{tuple(corr.shape)} (minimal pairs must have equal token counts)"
        )
    if clean.shape[0] == 0:
        raise ValueError("empty batch of tokens")


def run_from_layer(model, resid: Float[Tensor, "n pos d_model"], layer: int, readout: Readout):
    """Run blocks ``layer..`` on ``resid`` (any hooks on the model fire) and apply ``readout``."""
    final = model(resid, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
    return readout(model, final)


def forward_collect(
    model,
    tokens: Int[Tensor, "batch pos"],
    hook_names: Sequence[str],
    readout: Readout,
) -> tuple[list[Tensor], dict[str, Tensor], Tensor]:
    """One forward pass; returns (resid_pre of every layer, activations at ``hook_names``, output).

    ``resid_pre[n_layers]`` is the final residual stream.
    """
    acts: dict[str, Tensor] = {}

    def save(act, hook):
        acts[hook.name] = act.detach()

    resids = [model(tokens, stop_at_layer=0)]
    with model.hooks(fwd_hooks=[(h, save) for h in hook_names]):
        for layer in range(model.cfg.n_layers):
            resids.append(model(resids[-1], start_at_layer=layer, stop_at_layer=layer + 1))
    out = readout(model, resids[-1])
    return [r.detach() for r in resids], acts, out.detach()


def expand_batch(x: Tensor, k: int) -> Tensor:
    """``[batch, ...] -> [k * batch, ...]``; copy ``i`` occupies rows ``i*batch:(i+1)*batch``."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


def _where_units(act: Tensor, sel: Tensor, value: Tensor, k: int) -> Tensor:
    """Mix ``act`` ``[k*b, pos, size, ...]`` with ``value`` where ``sel`` ``[k, pos, size]``."""
    b = act.shape[0] // k
    v = act.reshape(k, b, *act.shape[1:])
    s = sel.reshape(k, 1, *sel.shape[1:], *([1] * (act.ndim - 3)))
    return torch.where(s, value, v).reshape(act.shape)


# ----------------------------------------------------------------------------- results


@dataclass
class PatchScores:
    """Patching results for a list of unit groups.

    ``patched[hook]`` holds the mean metric of the patched run per unit (``[size]``) or per
    position and unit (``[pos, size]``). For attribution methods it is the linear estimate
    ``m_corr + attribution``. ``clean_metric`` / ``corr_metric`` are the unpatched means and
    ``n`` the number of examples (used to merge batches of different lengths).
    """

    groups: list[Group]
    patched: dict[str, Tensor]
    clean_metric: float
    corr_metric: float
    n: int
    method: str = "activation"
    per_position: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def denominator(self) -> float:
        """``m_clean - m_corr`` (raises if it is zero: the pair does not move the metric)."""
        d = self.clean_metric - self.corr_metric
        if d == 0:
            raise ValueError("clean and corrupted metrics are equal; normalised scores undefined")
        return d

    def normalised(self) -> dict[str, Tensor]:
        """``(m_patched - m_corr) / (m_clean - m_corr)`` per hook."""
        d = self.denominator
        return {h: (v - self.corr_metric) / d for h, v in self.patched.items()}

    def flat(self, normalise: bool = True) -> Float[Tensor, "n_units"]:
        """One score per unit in group order.

        Per-position results are summed over positions (their effects relative to the
        corrupted run), an approximation of patching the unit at all positions at once.
        """
        vals = self.normalised() if normalise else self.patched
        out = []
        for g in self.groups:
            v = vals[g.hook_name]
            if self.per_position:
                # effects add up over positions: sum (v - baseline), baseline 0 if normalised
                base = 0.0 if normalise else self.corr_metric
                v = (v - base).sum(0) + base
            out.append(v)
        return torch.cat(out).float().cpu()

    def layer_grid(self, kind: str = "head", normalise: bool = False) -> Tensor:
        """Stack the groups of one kind by layer: ``[n_layers, size]`` or ``[n_layers, pos, size]``
        (the layout of ``transformer_lens.patching.get_act_patch_attn_head_out_*``)."""
        vals = self.normalised() if normalise else self.patched
        gs = sorted((g for g in self.groups if g.kind == kind), key=lambda g: g.layer)
        if not gs:
            raise ValueError(f"no {kind!r} groups in these scores")
        return torch.stack([vals[g.hook_name] for g in gs])


def merge_scores(parts: Sequence[PatchScores]) -> PatchScores:
    """Combine results of batches (e.g. length groups) weighted by their example counts."""
    if not parts:
        raise ValueError("no patching results to merge")
    if len(parts) == 1:
        return parts[0]
    if any(p.per_position for p in parts):
        raise ValueError("per-position scores of different batches cannot be merged")
    total = sum(p.n for p in parts)

    def wavg(vals):
        return sum(p.n * v for p, v in zip(parts, vals)) / total

    first = parts[0]
    return PatchScores(
        groups=first.groups,
        patched={h: wavg([p.patched[h] for p in parts]) for h in first.patched},
        clean_metric=float(wavg([p.clean_metric for p in parts])),
        corr_metric=float(wavg([p.corr_metric for p in parts])),
        n=total,
        method=first.method,
        per_position=False,
    )


# ----------------------------------------------------------------------------- activation patching


@torch.no_grad()
def activation_patching(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corr_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    groups: Sequence[Group] | None = None,
    per_position: bool = False,
    readout: str | Readout = "logits",
    chunk_rows: int = 4096,
    fast: bool = True,
) -> PatchScores:
    """Patch every unit (optionally at every position) from the clean into the corrupted run.

    ``metric`` maps readout output with leading dims ``[..., batch]`` to ``[..., batch]``; the
    score of a patch is its mean over the batch. ``chunk_rows`` bounds the rows of one forward
    pass (copies x batch). Hooks already on the model (e.g. masks) stay active.

    With ``fast`` (default), per-position head patching of a standard causal model without
    hooks runs on the exact suffix-only path of
    :mod:`subroutine_circuits.patching.fast_forward`; everything else (and ``fast=False``) runs
    the generic path. ``extra["path"]`` of the result names the path taken (``"generic"``,
    ``"fast-last"`` or ``"fast-suffix"``) and ``extra["fallback_reason"]`` why the fast path
    was not taken.
    """
    _check_model(model)
    _check_tokens(clean_tokens, corr_tokens)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    groups = list(groups) if groups is not None else unit_groups(model)
    readout = get_readout(readout)
    reason = "fast=False"
    if fast:
        from .fast_forward import fast_head_patching_by_pos, fast_path_unsupported

        reason = fast_path_unsupported(model, groups, per_position, readout)
        if reason is None:
            return fast_head_patching_by_pos(
                model, clean_tokens, corr_tokens, metric, groups, readout, chunk_rows
            )
    hooks = [g.hook_name for g in groups]
    _, clean_acts, clean_out = forward_collect(model, clean_tokens, hooks, readout)
    corr_resids, _, corr_out = forward_collect(model, corr_tokens, [], readout)
    m_clean = float(metric(clean_out).float().mean())
    m_corr = float(metric(corr_out).float().mean())
    batch, n_pos = corr_tokens.shape
    k_max = max(1, chunk_rows // batch)

    patched = {
        g.hook_name: torch.zeros((n_pos, g.size) if per_position else (g.size,)) for g in groups
    }
    for layer in sorted({g.layer for g in groups}):
        # items: (group, unit index, position or -1)
        items = [
            (g, u, p)
            for g in groups
            if g.layer == layer
            for u in range(g.size)
            for p in (range(n_pos) if per_position else [-1])
        ]
        resid = corr_resids[layer]
        for start in range(0, len(items), k_max):
            chunk = items[start : start + k_max]
            k = len(chunk)
            sels = {}
            for g in groups:
                if g.layer != layer:
                    continue
                # built on the CPU, moved once (avoids one tiny kernel per unit on a GPU)
                sel = torch.zeros(k, n_pos, g.size, dtype=torch.bool)
                for i, (gi, u, p) in enumerate(chunk):
                    if gi is g:
                        if p < 0:
                            sel[i, :, u] = True
                        else:
                            sel[i, p, u] = True
                if sel.any():
                    sels[g.hook_name] = sel.to(resid.device)

            def hook_fn(act, hook, k=k, sels=sels):
                return _where_units(act, sels[hook.name], clean_acts[hook.name], k)

            with model.hooks(fwd_hooks=[(h, hook_fn) for h in sels]):
                out = run_from_layer(model, expand_batch(resid, k), layer, readout)
            vals = metric(out.reshape(k, batch, *out.shape[1:])).float().mean(-1).cpu()
            for i, (g, u, p) in enumerate(chunk):
                if p < 0:
                    patched[g.hook_name][u] = vals[i]
                else:
                    patched[g.hook_name][p, u] = vals[i]
    return PatchScores(
        groups=list(groups),
        patched=patched,
        clean_metric=m_clean,
        corr_metric=m_corr,
        n=batch,
        method="activation",
        per_position=per_position,
        extra={"path": "generic", "fallback_reason": reason},
    )
