"""Find and keep only the units a part needs: zero ablation, greedy pruning, compaction.

A unit is ``(layer, kind, index)`` with kind ``"head"`` (``blocks.{l}.attn.hook_z``, axis 2)
or ``"neuron"`` (``blocks.{l}.mlp.hook_post``, axis 2), the vocabulary of ``masks.UnitMap``.

The planted subnetwork of a part is defined by :func:`greedy_prune` (zero ablation, on the
part's own problems): starting from all units, units are removed, least important first, while
the part stays within ``tol`` of its accuracy and within ``loss_tol`` nats of its mean
cross-entropy; then units whose own removal raises the loss by less than ``min_effect`` nats are
removed too. The result ``S``: every unit of ``S`` matters (ablating it on top of the removed
ones raises the loss by at least ``min_effect`` or breaks a tolerance), every unit outside ``S``
was removed by one of those two rules. The pruned part's accuracy and loss are reported.
:func:`compact_part` then builds the part with only ``S``: units of ``S`` are moved to the front
of their layer (heads and neurons of a layer are summed, so order is irrelevant), the layer width
becomes the largest kept count over layers, and the remaining slots get all-zero weights (their
activations are exactly zero, so zero- and mean-ablating them changes nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

Unit = tuple[int, str, int]
HOOKS = {"head": "blocks.{layer}.attn.hook_z", "neuron": "blocks.{layer}.mlp.hook_post"}


def all_units(model: Any) -> list[Unit]:
    """Every head and MLP neuron of a ``HookedTransformer``, in ``tl_unit_map`` order."""
    cfg = model.cfg
    out: list[Unit] = []
    for layer in range(cfg.n_layers):
        out.extend((layer, "head", h) for h in range(cfg.n_heads))
        out.extend((layer, "neuron", n) for n in range(cfg.d_mlp))
    return out


def ablation_hooks(model: Any, units: Iterable[Unit]) -> list[tuple[str, Any]]:
    """Forward hooks that set the activations of ``units`` to zero (for ``model.hooks``)."""
    by_hook: dict[str, list[int]] = {}
    for layer, kind, idx in units:
        if kind not in HOOKS:
            raise ValueError(f"unknown unit kind {kind!r}; use 'head' or 'neuron'")
        by_hook.setdefault(HOOKS[kind].format(layer=layer), []).append(int(idx))
    hooks = []
    for name, idxs in by_hook.items():
        if name not in model.hook_dict:
            raise ValueError(f"model has no hook {name!r}")
        index = torch.tensor(sorted(set(idxs)), dtype=torch.long)

        def zero(x: Tensor, hook: Any, index: Tensor = index) -> Tensor:
            # x: [batch, pos, head, d_head] (hook_z) or [batch, pos, d_mlp] (hook_post)
            x = x.clone()
            x[:, :, index.to(x.device)] = 0.0
            return x

        hooks.append((name, zero))
    return hooks


@dataclass
class Encoded:
    """OOO problems as tensors: ``tokens [b, 4, pos]``, ``lengths [b, 4]``, ``odd [b]``."""

    tokens: Int[Tensor, "b 4 pos"]
    lengths: Int[Tensor, "b 4"]
    odd: Int[Tensor, " b"]

    @classmethod
    def of(cls, problems: Sequence[Any], tokenizer: Any) -> Encoded:
        """Encode ``OOOProblem`` objects with the library's readout encoding."""
        from subroutine_circuits.models import encode_problems

        return cls(*encode_problems(list(problems), tokenizer))


@torch.no_grad()
def accuracy(
    model: Any,
    data: Encoded,
    ablate: Iterable[Unit] = (),
    pool: str | None = None,
    batch_size: int = 512,
) -> float:
    """OOO accuracy of ``model`` with ``ablate`` zero-ablated (hooks removed afterwards)."""
    from subroutine_circuits.models import ooo_logits

    correct = 0
    with model.hooks(fwd_hooks=ablation_hooks(model, ablate)):
        for i in range(0, data.tokens.shape[0], batch_size):
            logits = ooo_logits(
                model, data.tokens[i : i + batch_size], data.lengths[i : i + batch_size], pool
            )
            correct += int((logits.argmax(-1) == data.odd[i : i + batch_size]).sum())
    return correct / data.tokens.shape[0]


def _unit_masks(
    model: Any, configs: Sequence[set[Unit]]
) -> dict[str, Float[Tensor, "config units"]]:
    """Per hook, a ``[n_configs, n_units_of_hook]`` 0/1 tensor: 0 where the config ablates."""
    cfg = model.cfg
    out: dict[str, Tensor] = {}
    for layer in range(cfg.n_layers):
        out[HOOKS["head"].format(layer=layer)] = torch.ones(len(configs), cfg.n_heads)
        out[HOOKS["neuron"].format(layer=layer)] = torch.ones(len(configs), cfg.d_mlp)
    for c, units in enumerate(configs):
        for layer, kind, idx in units:
            out[HOOKS[kind].format(layer=layer)][c, idx] = 0.0
    return out


@torch.no_grad()
def evaluate_ablations(
    model: Any,
    data: Encoded,
    configs: Sequence[Iterable[Unit]],
    pool: str | None = None,
    max_rows: int = 4096,
) -> tuple[list[float], list[float]]:
    """Accuracy and mean cross-entropy of ``model`` under each zero-ablation config.

    Several configs share one forward pass: the problems are repeated once per config and a hook
    per ``hook_z`` / ``hook_post`` multiplies each copy by its config's 0/1 unit mask. At most
    ``max_rows`` problems (configs x problems) go through one pass.
    """
    import torch.nn.functional as F

    from subroutine_circuits.models import ooo_logits

    configs = [set(c) for c in configs]
    n = data.tokens.shape[0]
    per_pass = max(1, max_rows // n)
    accs: list[float] = []
    losses: list[float] = []
    for start in range(0, len(configs), per_pass):
        chunk = configs[start : start + per_pass]
        c = len(chunk)
        masks = _unit_masks(model, chunk)
        hooks = []
        for name, m in masks.items():

            def mix(x: Tensor, hook: Any, m: Tensor = m, c: int = c) -> Tensor:
                # x: [c*n*4, pos, head, d_head] (hook_z) or [c*n*4, pos, d_mlp] (hook_post)
                shape = x.shape
                xv = x.reshape(c, -1, *shape[1:])
                mv = m.to(x.device, x.dtype).view(c, 1, 1, m.shape[1], *([1] * (x.ndim - 3)))
                return (xv * mv).reshape(shape)

            hooks.append((name, mix))
        tokens = data.tokens.repeat(c, 1, 1)
        lengths = data.lengths.repeat(c, 1)
        odd = data.odd.repeat(c)
        with model.hooks(fwd_hooks=hooks):
            logits = ooo_logits(model, tokens, lengths, pool)
        correct = (logits.argmax(-1) == odd).view(c, n).float().mean(1)
        loss = F.cross_entropy(logits, odd, reduction="none").view(c, n).mean(1)
        accs.extend(correct.tolist())
        losses.extend(loss.tolist())
    return accs, losses


def attribution_importance(model: Any, data: Encoded, pool: str | None = None) -> dict[Unit, float]:
    """``sum |a * dL/da|`` per unit (first-order estimate of the loss change of ablating it)."""
    import torch.nn.functional as F

    from subroutine_circuits.models import ooo_logits

    cfg = model.cfg
    cache: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> Tensor:
        x.retain_grad()
        cache[hook.name] = x
        return x

    names = [HOOKS[k].format(layer=layer) for layer in range(cfg.n_layers) for k in HOOKS]
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
            emb_hook = model.hook_dict["hook_embed"]
            with model.hooks(fwd_hooks=[(emb_hook.name, lambda x, hook: x.requires_grad_())]):
                logits = ooo_logits(model, data.tokens, data.lengths, pool)
            F.cross_entropy(logits, data.odd, reduction="sum").backward()
    finally:
        for p, r in zip(model.parameters(), params):
            p.requires_grad_(r)
    out: dict[Unit, float] = {}
    for layer in range(cfg.n_layers):
        for kind, tmpl in HOOKS.items():
            x = cache[tmpl.format(layer=layer)]
            contrib = (x * x.grad).detach()
            # heads: [b, pos, head, d_head] -> sum over d_head first (a head is one unit)
            if kind == "head":
                contrib = contrib.sum(-1)
            per_unit = contrib.abs().sum(dim=(0, 1))
            for i, v in enumerate(per_unit.tolist()):
                out[(layer, kind, i)] = v
    return out


@dataclass
class PruneResult:
    """What :func:`greedy_prune` found.

    ``kept``: the planted units; ``base_acc`` / ``base_loss``: accuracy and mean cross-entropy
    with nothing ablated; ``pruned_acc`` / ``pruned_loss``: with every unit outside ``kept``
    ablated (within the tolerances); ``necessity[u]``: ``pruned_acc`` minus the accuracy when
    ``u`` is ablated as well; ``loss_necessity[u]``: the loss increase of that (at least
    ``min_effect`` by construction).
    """

    kept: set[Unit]
    base_acc: float
    base_loss: float
    pruned_acc: float
    pruned_loss: float
    tol: float
    loss_tol: float
    necessity: dict[Unit, float] = field(default_factory=dict)
    loss_necessity: dict[Unit, float] = field(default_factory=dict)
    evaluations: int = 0

    @property
    def min_necessity(self) -> float:
        """The smallest accuracy drop of removing one more planted unit."""
        return min(self.necessity.values()) if self.necessity else float("nan")


def greedy_prune(
    model: Any,
    data: Encoded,
    tol: float = 0.01,
    loss_tol: float = 0.05,
    pool: str | None = None,
    max_passes: int = 4,
    min_effect: float = 0.01,
) -> PruneResult:
    """Backward elimination of units under zero ablation (see the module docstring).

    A set of ablated units is *allowed* when the accuracy stays ``>= base_acc - tol`` and the
    mean cross-entropy ``<= base_loss + loss_tol`` (the loss keeps the margin that accuracy
    alone would strip, so the pruned part still generalises). Units are visited least important
    first (:func:`attribution_importance`): a binary search finds a long allowed prefix of that
    order, then each remaining unit is removed when the set stays allowed, pass after pass until
    nothing changes. Finally units whose own removal (on top of the others) raises the loss by
    less than ``min_effect`` nats are removed one at a time, smallest first (these are units the
    tolerance budget kept only because earlier removals had used it up; a method cannot be asked
    to find a unit of negligible effect). At the end no single kept unit can be removed within
    the tolerances, and removing any one raises the loss by at least ``min_effect``.
    """
    if not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol}")
    if not loss_tol >= 0:
        raise ValueError(f"loss_tol must be >= 0, got {loss_tol}")
    units = all_units(model)
    n_evals = 0

    def evaluate(configs: Sequence[set[Unit]]) -> tuple[list[float], list[float]]:
        nonlocal n_evals
        n_evals += len(configs)
        return evaluate_ablations(model, data, configs, pool)

    (base,), (base_loss,) = evaluate([set()])

    def allowed(acc: float, loss: float) -> bool:
        return acc >= base - tol - 1e-9 and loss <= base_loss + loss_tol

    importance = attribution_importance(model, data, pool)
    order = sorted(units, key=lambda u: importance[u])
    lo, hi = 0, len(order)  # the prefix of length lo is allowed; search for a longer one
    while lo < hi:
        mid = (lo + hi + 1) // 2
        (acc,), (loss,) = evaluate([set(order[:mid])])
        if allowed(acc, loss):
            lo = mid
        else:
            hi = mid - 1
    removed: set[Unit] = set(order[:lo])
    for _ in range(max_passes):
        changed = False
        for u in order:
            if u in removed:
                continue
            (acc,), (loss,) = evaluate([removed | {u}])
            if allowed(acc, loss):
                removed.add(u)
                changed = True
        if not changed:
            break
    if min_effect < 0:
        raise ValueError(f"min_effect must be >= 0, got {min_effect}")
    while True:
        kept = [u for u in units if u not in removed]
        if not kept or min_effect == 0:
            break
        (_,), (now_loss,) = evaluate([removed])
        _, losses = evaluate([removed | {u} for u in kept])
        effect = [loss - now_loss for loss in losses]
        weakest = min(range(len(kept)), key=lambda i: effect[i])
        if effect[weakest] >= min_effect:
            break
        removed.add(kept[weakest])
    kept = [u for u in units if u not in removed]
    (pruned,), (pruned_loss,) = evaluate([removed])
    necessity: dict[Unit, float] = {}
    loss_necessity: dict[Unit, float] = {}
    if kept:
        accs, losses = evaluate([removed | {u} for u in kept])
        necessity = {u: pruned - a for u, a in zip(kept, accs)}
        loss_necessity = {u: loss - pruned_loss for u, loss in zip(kept, losses)}
    return PruneResult(
        set(kept), base, base_loss, pruned, pruned_loss, tol, loss_tol, necessity,
        loss_necessity, n_evals,
    )  # fmt: skip


@torch.no_grad()
def compact_part(
    model: Any, keep: Iterable[Unit], keep_width: bool = False
) -> tuple[Any, set[Unit], dict[Unit, Unit]]:
    """A copy of ``model`` holding only the units ``keep`` (see the module docstring).

    Returns ``(new_model, kept_units_in_new_model, old_to_new)``. The new model is built with
    ``models.make_model`` (same pool attribute). Its output equals ``model``'s with every unit
    outside ``keep`` zero-ablated (up to float summation order). With ``keep_width=True`` the
    widths and unit indices stay as they are and only the dropped units' weights are zeroed.
    """
    from subroutine_circuits.models import ModelSpec, make_model
    from subroutine_circuits.models.presets import POOL_ATTR

    keep = set(keep)
    cfg = model.cfg
    heads = [sorted(i for (l_, k, i) in keep if l_ == layer and k == "head") for layer in
             range(cfg.n_layers)]  # fmt: skip
    neurons = [sorted(i for (l_, k, i) in keep if l_ == layer and k == "neuron") for layer in
               range(cfg.n_layers)]  # fmt: skip
    n_heads = max(1, max(len(h) for h in heads))
    d_mlp = max(1, max(len(n) for n in neurons))
    if keep_width:
        n_heads, d_mlp = int(cfg.n_heads), int(cfg.d_mlp)
    spec = ModelSpec(
        "tiny",
        attention=cfg.attention_dir,
        n_ctx=int(cfg.n_ctx),
        pool=getattr(model, POOL_ATTR, "last"),
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        n_heads=n_heads,
        d_head=int(cfg.d_head),
        d_mlp=d_mlp,
        act_fn=cfg.act_fn,
        normalization_type=cfg.normalization_type,
    )
    new = make_model(spec, vocab_size=int(cfg.d_vocab), seed=0)
    dtype = model.embed.W_E.dtype
    if new.embed.W_E.dtype != dtype:
        new.to(dtype, print_details=False)
    old_sd, sd = model.state_dict(), new.state_dict()
    for k in ("embed.W_E", "pos_embed.W_pos", "unembed.W_U", "unembed.b_U"):
        sd[k] = old_sd[k].clone()
    mapping: dict[Unit, Unit] = {}
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        for k in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O"):
            sd[f"{p}.attn.{k}"].zero_()
        for new_h, old_h in enumerate(heads[layer]):
            new_h = old_h if keep_width else new_h
            for k in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O"):
                sd[f"{p}.attn.{k}"][new_h] = old_sd[f"{p}.attn.{k}"][old_h]
            mapping[(layer, "head", old_h)] = (layer, "head", new_h)
        sd[f"{p}.attn.b_O"] = old_sd[f"{p}.attn.b_O"].clone()
        # the MLP's output bias stays even if no neuron of the layer is kept (it is not a unit)
        sd[f"{p}.mlp.W_in"].zero_()
        sd[f"{p}.mlp.b_in"].zero_()
        sd[f"{p}.mlp.W_out"].zero_()
        for new_n, old_n in enumerate(neurons[layer]):
            new_n = old_n if keep_width else new_n
            sd[f"{p}.mlp.W_in"][:, new_n] = old_sd[f"{p}.mlp.W_in"][:, old_n]
            sd[f"{p}.mlp.b_in"][new_n] = old_sd[f"{p}.mlp.b_in"][old_n]
            sd[f"{p}.mlp.W_out"][new_n] = old_sd[f"{p}.mlp.W_out"][old_n]
            mapping[(layer, "neuron", old_n)] = (layer, "neuron", new_n)
        sd[f"{p}.mlp.b_out"] = old_sd[f"{p}.mlp.b_out"].clone()
    new.load_state_dict(sd)
    new.eval()
    return new, set(mapping.values()), mapping
