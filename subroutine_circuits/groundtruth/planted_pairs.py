"""A planted model for prompt-pair objectives: the logit difference is carried by known units.

Construction (exact, by weights; no training): a 2-layer model without normalisation, random
weights, and one direction ``u`` of the residual stream.

- The unembedding's answer and wrong columns differ by ``g * u`` only, so the logit difference
  of the two is ``g`` times the ``u``-component of the final residual plus a bias (set so that
  the median over random prompts is zero: the model has no preference on average).
- The embeddings, every bias and every unit outside the planted set write nothing along ``u``
  (their output weights are projected off ``u``).
- The planted heads of layer 0 write only along ``u`` (rank-one ``W_O``); they read the token
  embeddings, so what they write depends on the prompt.
- The planted neurons of layer 1 read only the ``u``-component of their input (which is the
  planted heads' output: nothing else writes along ``u``) and write along ``u``; half of them
  with the opposite sign in and out, so that they amplify the heads' signal of either sign.

So the ``u``-component of the final residual, and with it the logit difference, is a function of
the planted units' activations alone: with every other unit on any activation (e.g. the
corrupted prompt's), the logit difference is that of the full model. The planted set is
sufficient exactly; each planted unit is necessary in the sense that its removal changes the
logit difference (``PlantedPairs.effects`` has each unit's measured effect).

Prompt pairs: random token sequences (the answer and wrong tokens excluded), the corrupted
prompt another random sequence of the same length; answer and wrong are oriented so that the
clean prompt prefers the answer, and only pairs whose corrupted prompt prefers the wrong token
are kept (the corruption flips the decision).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

__all__ = ["PlantedPairs", "build_planted_pairs"]

#: planted units: heads (layer, head) of layer 0 and neurons (layer, index) of layer 1
PLANTED_HEADS = ((0, 0), (0, 1))
PLANTED_NEURONS = ((1, 0), (1, 1), (1, 2), (1, 3))
ANSWER, WRONG = 0, 1


@dataclass
class PlantedPairs:
    """The planted model, its prompt pairs and the truth over ``adapter.unit_map()``."""

    model: Any
    pairs: Any
    truth: Bool[Tensor, " n_units"]
    unit_map: Any
    effects: dict[str, float] = field(default_factory=dict)


def _off(w: Tensor, u: Tensor) -> Tensor:
    """``w`` with its component along ``u`` (last axis) removed."""
    return w - (w @ u)[..., None] * u


def build_planted_pairs(
    seed: int = 0, *, n_pairs: int = 96, seq_len: int = 6, d_mlp: int = 32, vocab: int = 24
) -> PlantedPairs:
    """Build the planted model (see the module docstring) and ``n_pairs`` prompt pairs."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.models import ModelSpec, make_model
    from subroutine_circuits.objectives import LogitDiff, PromptPairs

    spec = ModelSpec(
        preset="tiny", attention="causal", n_ctx=seq_len + 2,
        overrides={"n_layers": 2, "d_mlp": d_mlp, "normalization_type": None},
    )  # fmt: skip
    model = make_model(spec, vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    d = state["embed.W_E"].shape[1]
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    for key in ("embed.W_E", "pos_embed.W_pos"):
        state[key] = _off(state[key], u)
    for layer in range(2):
        a = f"blocks.{layer}.attn."
        m = f"blocks.{layer}.mlp."
        state[a + "W_O"] = _off(state[a + "W_O"], u)
        state[a + "b_O"] = _off(state[a + "b_O"], u)
        state[m + "W_out"] = _off(state[m + "W_out"], u)
        state[m + "b_out"] = _off(state[m + "b_out"], u)
    for layer, head in PLANTED_HEADS:
        w_o = state[f"blocks.{layer}.attn.W_O"]
        v = torch.randn(w_o.shape[1], generator=gen)
        state[f"blocks.{layer}.attn.W_O"][head] = torch.outer(v / v.norm(), u) * 2.0
    for i, (layer, n) in enumerate(PLANTED_NEURONS):
        sign = 1.0 if i % 2 == 0 else -1.0
        state[f"blocks.{layer}.mlp.W_in"][:, n] = sign * 2.0 * u
        state[f"blocks.{layer}.mlp.b_in"][n] = 0.0
        state[f"blocks.{layer}.mlp.W_out"][n] = sign * 1.5 * u
    w_u, b_u = state["unembed.W_U"], state["unembed.b_U"]
    w_u[:, ANSWER] = w_u[:, WRONG] + u
    b_u[ANSWER] = b_u[WRONG]
    model.load_state_dict(state)
    model.eval()
    adapter = as_adapter(model)

    def u_component(tokens: Tensor) -> Tensor:
        with torch.no_grad():
            logits = model(tokens)[:, -1]
        return logits[:, ANSWER] - logits[:, WRONG]

    # draw pairs; keep those whose corruption flips the decision
    n_draw = 8 * n_pairs
    clean = torch.randint(2, vocab, (n_draw, seq_len), generator=gen)
    corr = torch.randint(2, vocab, (n_draw, seq_len), generator=gen)
    ld_clean, ld_corr = u_component(clean), u_component(corr)
    center = float(torch.cat([ld_clean, ld_corr]).median())  # the answer bias: none on average
    ld_clean, ld_corr = ld_clean - center, ld_corr - center
    flip = (ld_clean.sign() * ld_corr.sign()) < 0
    idx = torch.nonzero(flip).flatten()[:n_pairs]
    if len(idx) < n_pairs:
        raise ValueError(f"only {len(idx)} of {n_pairs} planted pairs flip the decision")
    sign = ld_clean[idx] > 0
    answer = torch.where(sign, ANSWER, WRONG)
    wrong = torch.where(sign, WRONG, ANSWER)
    # scale the answer direction so that the clean logit difference is about 4 on average
    scale = 4.0 / float(ld_clean[idx].abs().mean())
    state["unembed.W_U"][:, ANSWER] = w_u[:, WRONG] + scale * u
    state["unembed.b_U"][ANSWER] = b_u[WRONG] - scale * center
    model.load_state_dict(state)
    positions = torch.full((len(idx),), seq_len - 1)
    pairs = PromptPairs(clean[idx], corr[idx], positions, answer, wrong)
    unit_map = adapter.unit_map()
    truth = torch.zeros(unit_map.n_units, dtype=torch.bool)
    start = 0
    for g in unit_map.groups:
        planted = PLANTED_HEADS if g.kind == "head" else PLANTED_NEURONS
        for layer, i in planted:
            if g.layer == layer:
                truth[start + i] = True
        start += g.size
    effects = {}
    ld = LogitDiff()
    full = float(ld.values(adapter, pairs).mean())
    from subroutine_circuits.masks import UnitMask

    for j in torch.nonzero(truth).flatten().tolist():
        keep = torch.ones(unit_map.n_units, dtype=torch.bool)
        keep[j] = False
        mask = UnitMask.fixed(unit_map, keep, "resample")
        effects[str(j)] = full - float(ld.values(adapter, pairs, mask).mean())
    return PlantedPairs(model, pairs, truth, unit_map, effects)
