"""Circuits out and in, in the MIB / EAP-IG circuit JSON format.

MIB's circuit track (and the EAP-IG library it builds on) writes a circuit of a transformer as a
graph over *nodes* ``input``, ``a{layer}.h{head}`` (attention heads), ``m{layer}`` (MLPs) and
``logits``, and *edges* ``"{src}->{dst}"`` (``"{src}->a{l}.h{h}<q>"`` / ``<k>`` / ``<v>`` into
the three inputs of a head). Our circuits are boolean vectors over the units of a
:class:`~subroutine_circuits.masks.UnitMap` (heads of ``blocks.{l}.attn.hook_z``, neurons of
``blocks.{l}.mlp.hook_post``), so the conversion is:

* a head node is in the graph iff its head unit is kept;
* an MLP node ``m{l}`` is in the graph iff any of its neurons is kept; the kept neuron indices
  go under the extra top-level key ``"mlp_neurons"`` (and per-neuron scores under
  ``"mlp_neuron_scores"``) so that our own files load back exactly;
* ``input``, ``logits`` and nodes the unit map does not cover are always in the graph (our masks
  never ablate them);
* an edge is in the graph iff both its endpoints are: a node circuit induces its edge circuit the
  way MIB's node-level evaluation does (``apply_topn(level="node")`` switches on every outgoing
  edge of a kept node, then pruning drops edges into removed nodes). Edge scores are membership
  (1.0 / 0.0); the ranking information lives on the nodes.

The format is described in ``docs/CIRCUIT_FORMAT.md``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from subroutine_circuits.masks.units import UnitMap
from subroutine_circuits.utils import atomic_write_text

FORMAT_VERSION = 1
#: Top-level key of our metadata (unit map, format version).
META_KEY = "subroutine_circuits"
#: Top-level key of the kept MLP neuron indices per MLP node (not part of EAP-IG's format).
NEURONS_KEY = "mlp_neurons"
#: Top-level key of the per-neuron scores per MLP node (``d_mlp`` floats or nulls).
NEURON_SCORES_KEY = "mlp_neuron_scores"
QKV = ("q", "k", "v")

_HEAD_RE = re.compile(r"a(\d+)\.h(\d+)")
_MLP_RE = re.compile(r"m(\d+)")
_EDGE_RE = re.compile(r"(.+?)->(.+?)(?:<([qkv])>)?")


# ----------------------------------------------------------------------------- graph shape


def mib_node_names(n_layers: int, n_heads: int) -> list[str]:
    """Node names of a MIB / EAP-IG graph, in EAP-IG's order (input, per layer heads then MLP,
    logits)."""
    names = ["input"]
    for layer in range(n_layers):
        names += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
    return names + ["logits"]


def mib_edges(
    n_layers: int, n_heads: int, parallel_attn_mlp: bool = False
) -> list[tuple[str, str, str | None]]:
    """``(src, dst, qkv)`` of every edge of a MIB / EAP-IG graph, in EAP-IG's order.

    Every earlier node writes into the residual stream read by a later node; a head is read
    through its q, k and v inputs. With ``parallel_attn_mlp`` the MLP of a layer does not read
    that layer's heads.
    """
    edges: list[tuple[str, str, str | None]] = []
    resid = ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        mlp = f"m{layer}"
        for src in resid:
            edges += [(src, dst, x) for dst in heads for x in QKV]
            if parallel_attn_mlp:
                edges.append((src, mlp, None))
        if not parallel_attn_mlp:
            edges += [(src, mlp, None) for src in resid + heads]
        resid += heads + [mlp]
    return edges + [(src, "logits", None) for src in resid]


def edge_name(src: str, dst: str, qkv: str | None = None) -> str:
    """EAP-IG's edge name: ``"{src}->{dst}"``, plus ``"<q>"`` etc. into a head."""
    return f"{src}->{dst}" if qkv is None else f"{src}->{dst}<{qkv}>"


def _layout(unit_map: UnitMap) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """``(heads, neurons)``: ``{layer: (offset, size)}`` of the head / neuron groups."""
    heads: dict[int, tuple[int, int]] = {}
    neurons: dict[int, tuple[int, int]] = {}
    for g, off in zip(unit_map.groups, unit_map.offsets()):
        table = {"head": heads, "neuron": neurons}.get(g.kind)
        if table is None:
            raise ValueError(
                f"unit kind {g.kind!r} ({g.hook_name}) has no MIB node; only 'head' and 'neuron' "
                "units convert"
            )
        if g.layer < 0:
            raise ValueError(f"group {g.hook_name} has no layer (layer={g.layer})")
        if g.layer in table:
            raise ValueError(f"the unit map has two {g.kind} groups in layer {g.layer}")
        table[g.layer] = (off, g.size)
    sizes = {s for _, s in heads.values()}
    if len(sizes) > 1:
        raise ValueError(f"head groups of different sizes {sorted(sizes)}: MIB needs one n_heads")
    return heads, neurons


def _num(x: float) -> float | None:
    """A JSON-safe float (None for NaN / inf)."""
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


# ----------------------------------------------------------------------------- export


def circuit_to_mib(
    unit_map: UnitMap,
    keep: Bool[Tensor, "n_units"],
    scores: Float[Tensor, "n_units"] | None = None,
    n_layers: int | None = None,
    neuron_detail: bool = True,
    *,
    n_heads: int | None = None,
    d_model: int | None = None,
    parallel_attn_mlp: bool = False,
) -> dict[str, Any]:
    """A unit-level circuit as a MIB / EAP-IG graph dict (JSON-ready).

    Args:
        unit_map: the units ``keep`` refers to (``head`` and ``neuron`` groups only).
        keep: which units are in the circuit (global unit order).
        scores: optional per-unit scores; a head node's score is its unit's, an MLP node's the
            sum of its neurons' (attribution scores add up to the whole MLP's, to first order).
            Non-finite scores are written as null.
        n_layers: layers of the model (default: the unit map's last layer + 1).
        neuron_detail: write the kept neuron indices (``"mlp_neurons"``) and, with ``scores``,
            the per-neuron scores (``"mlp_neuron_scores"``); without them a file loads back with
            whole MLPs.
        n_heads: heads per layer (default: the size of the head groups; needed when the unit
            map has none).
        d_model, parallel_attn_mlp: written to ``cfg`` (EAP-IG's ``Graph.from_json`` needs
            ``d_model``).

    Returns:
        ``{"cfg", "nodes", "edges", [mlp_neurons, mlp_neuron_scores,] "subroutine_circuits"}``.
    """
    heads, neurons = _layout(unit_map)
    n = unit_map.n_units
    keep = torch.as_tensor(keep).detach().flatten().cpu()
    if keep.numel() != n:
        raise ValueError(f"keep has {keep.numel()} entries, the unit map {n} units")
    keep = keep.bool()
    if scores is not None:
        scores = torch.as_tensor(scores).detach().flatten().cpu().double()
        if scores.numel() != n:
            raise ValueError(f"scores has {scores.numel()} entries, the unit map {n} units")
    head_sizes = {s for _, s in heads.values()}
    if n_heads is None:
        n_heads = head_sizes.pop() if head_sizes else 0
    elif head_sizes and head_sizes != {n_heads}:
        raise ValueError(f"n_heads={n_heads} but the head groups have {sorted(head_sizes)} heads")
    layers = set(heads) | set(neurons)
    if n_layers is None:
        n_layers = max(layers) + 1
    if max(layers) >= n_layers:
        raise ValueError(f"the unit map has layer {max(layers)} but n_layers={n_layers}")

    in_graph: dict[str, bool] = {}
    node_score: dict[str, float | None] = {}
    for name in mib_node_names(n_layers, n_heads):
        in_graph[name] = True  # input, logits and nodes outside the unit map are never ablated
    for layer, (off, size) in heads.items():
        for h in range(size):
            name = f"a{layer}.h{h}"
            in_graph[name] = bool(keep[off + h])
            if scores is not None:
                node_score[name] = _num(scores[off + h])
    out_neurons: dict[str, list[int]] = {}
    out_neuron_scores: dict[str, list[float | None]] = {}
    for layer, (off, size) in sorted(neurons.items()):
        name = f"m{layer}"
        kept = torch.nonzero(keep[off : off + size]).flatten().tolist()
        in_graph[name] = bool(kept)
        out_neurons[name] = kept
        if scores is not None:
            node_score[name] = _num(scores[off : off + size].sum())
            out_neuron_scores[name] = [_num(s) for s in scores[off : off + size]]

    nodes: dict[str, dict[str, Any]] = {}
    for name, inside in in_graph.items():
        nodes[name] = {"in_graph": inside}
        if node_score.get(name) is not None:  # EAP-IG: unscored nodes carry no "score"
            nodes[name]["score"] = node_score[name]
    edges = {}
    for src, dst, qkv in mib_edges(n_layers, n_heads, parallel_attn_mlp):
        inside = in_graph[src] and in_graph[dst]
        edges[edge_name(src, dst, qkv)] = {"score": float(inside), "in_graph": inside}

    cfg: dict[str, Any] = {
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "parallel_attn_mlp": bool(parallel_attn_mlp),
    }
    if d_model is not None:
        cfg["d_model"] = int(d_model)
    out: dict[str, Any] = {"cfg": cfg, "nodes": nodes, "edges": edges}
    if neuron_detail and neurons:
        out[NEURONS_KEY] = out_neurons
        if scores is not None:
            out[NEURON_SCORES_KEY] = out_neuron_scores
    out[META_KEY] = {
        "format_version": FORMAT_VERSION,
        "unit_map": unit_map.to_dict(),
        "n_units": n,
        "n_kept": int(keep.sum()),
        "neuron_detail": bool(neuron_detail),
        "edges": "induced: in_graph iff both endpoints are; score = float(in_graph)",
    }
    return out


# ----------------------------------------------------------------------------- import


def _parse_node(name: Any, n_layers: int, n_heads: int) -> tuple[str, int, int]:
    """``(kind, layer, head)`` of a node name (kind: input / logits / head / mlp), range-checked
    against the graph shape; ValueError naming the problem."""
    if name in ("input", "logits"):
        return name, -1, -1
    if not isinstance(name, str):
        raise ValueError(f"unknown node name {name!r}")
    m = _HEAD_RE.fullmatch(name)
    if m:
        layer, head = int(m.group(1)), int(m.group(2))
        if layer >= n_layers:
            raise ValueError(f"node {name!r}: layer {layer} outside the model's {n_layers} layers")
        if head >= n_heads:
            raise ValueError(f"node {name!r}: head {head} out of range (n_heads={n_heads})")
        return "head", layer, head
    m = _MLP_RE.fullmatch(name)
    if m:
        layer = int(m.group(1))
        if layer >= n_layers:
            raise ValueError(f"node {name!r}: layer {layer} outside the model's {n_layers} layers")
        return "mlp", layer, -1
    raise ValueError(
        f"unknown node name {name!r} (expected input, logits, a<layer>.h<head> or m<layer>)"
    )


def _edge_ends(edges: Mapping[str, Any], n_layers: int, n_heads: int) -> dict[str, tuple]:
    """``{edge name: (src, dst)}``, with names validated against the graph shape."""
    out = {}
    for name in edges:
        m = _EDGE_RE.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise ValueError(f"bad edge name {name!r} (expected '<src>-><dst>' or '...<q|k|v>')")
        src, dst, qkv = m.groups()
        (src_kind, *_), (dst_kind, *_) = (_parse_node(x, n_layers, n_heads) for x in (src, dst))
        if src_kind == "logits" or dst_kind == "input":
            raise ValueError(f"edge {name!r} runs out of logits or into input")
        if (qkv is None) == (dst_kind == "head"):
            raise ValueError(f"edge {name!r}: edges into heads (and only those) need <q|k|v>")
        out[name] = (src, dst)
    return out


def _in_graph(name: str, entry: Any) -> bool:
    if isinstance(entry, bool):  # older files map node names to booleans
        return entry
    if not isinstance(entry, Mapping) or "in_graph" not in entry:
        raise ValueError(f"node {name!r} has no 'in_graph'")
    return bool(entry["in_graph"])


def _load(data_or_path: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(data_or_path, Mapping):
        return data_or_path
    with open(data_or_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, Mapping):
        raise ValueError(f"{data_or_path}: a circuit file holds a JSON object")
    return data


def circuit_from_mib(
    data_or_path: Mapping[str, Any] | str | os.PathLike, unit_map: UnitMap | None = None
) -> Bool[Tensor, "n_units"]:
    """The keep vector of a MIB / EAP-IG circuit (a dict or a JSON file) over ``unit_map``.

    Exact for files written by :func:`circuit_to_mib` (kept neurons come from
    ``"mlp_neurons"``). For a foreign file, an MLP node in the graph keeps all its neurons (one
    warning); nodes the unit map does not cover cannot be ablated and are skipped (one warning if
    some are out of the graph); edges are only validated: a node is kept iff its ``in_graph``.

    Args:
        data_or_path: the parsed JSON or a path to it.
        unit_map: the units to return (default: the one stored in our metadata).

    Raises:
        ValueError: missing keys, unknown node / edge names, layers or heads outside the model,
            a unit map that does not fit the file, bad neuron lists.
    """
    data = _load(data_or_path)
    for key in ("nodes", "edges"):
        if not isinstance(data.get(key), Mapping):
            raise ValueError(f"not a MIB circuit: missing key {key!r} (or not a dict)")
    meta = data.get(META_KEY)
    has_map = isinstance(meta, Mapping) and isinstance(meta.get("unit_map"), Mapping)
    stored = UnitMap.from_dict(meta["unit_map"]) if has_map else None
    if unit_map is None:
        if stored is None:
            raise ValueError(f"no unit_map given and the file has no {META_KEY!r} metadata")
        unit_map = stored
    elif stored is not None and stored != unit_map:
        warnings.warn(
            "the circuit was exported over another unit map; loading by node name", stacklevel=2
        )
    heads, neurons = _layout(unit_map)
    cfg = data.get("cfg") if isinstance(data.get("cfg"), Mapping) else {}
    head_sizes = {s for _, s in heads.values()}
    n_layers = int(cfg.get("n_layers", max(set(heads) | set(neurons)) + 1))
    n_heads = int(cfg.get("n_heads", max(head_sizes, default=0)))
    if max(set(heads) | set(neurons)) >= n_layers or head_sizes - {n_heads}:
        raise ValueError(
            f"the unit map does not fit the file's model (n_layers={n_layers}, n_heads={n_heads})"
        )

    nodes: Mapping[str, Any] = data["nodes"]
    parsed = {name: _parse_node(name, n_layers, n_heads) for name in nodes}
    nrn = data.get(NEURONS_KEY) if isinstance(data.get(NEURONS_KEY), Mapping) else {}
    for name in nrn:
        if name not in nodes or parsed[name][0] != "mlp" or parsed[name][1] not in neurons:
            raise ValueError(f"{NEURONS_KEY!r} names {name!r}, not an MLP node of the unit map")
    ends = _edge_ends(data["edges"], n_layers, n_heads)
    node_in = {name: _in_graph(name, entry) for name, entry in nodes.items()}
    edge_level = any(
        isinstance(e, Mapping)
        and not e.get("in_graph", True)
        and all(node_in.get(x, True) for x in ends[name])
        for name, e in data["edges"].items()
    )

    keep = torch.zeros(unit_map.n_units, dtype=torch.bool)
    whole_mlps: list[str] = []
    uncovered: list[str] = []
    for name, (kind, layer, head) in parsed.items():
        inside = node_in[name]
        if kind == "head" and layer in heads:
            keep[heads[layer][0] + head] = inside
        elif kind == "mlp" and layer in neurons:
            off, size = neurons[layer]
            if name in nrn:
                idx = nrn[name]
                if not isinstance(idx, list) or not all(
                    isinstance(i, int) and 0 <= i < size for i in idx
                ):
                    raise ValueError(f"{NEURONS_KEY}[{name!r}] must list neuron indices < {size}")
                if bool(idx) != inside:
                    raise ValueError(f"node {name!r}: in_graph={inside} but neurons {idx}")
                keep[[off + i for i in idx]] = True
            else:
                keep[off : off + size] = inside
                whole_mlps += [name] if inside else []
        elif kind in ("head", "mlp") and not inside:
            uncovered.append(name)
    unit_nodes = [f"a{la}.h{h}" for la, (_, s) in heads.items() for h in range(s)]
    missing = [x for x in unit_nodes + [f"m{la}" for la in neurons] if x not in nodes]
    if missing:
        raise ValueError(f"the file has no node for units of the unit map: {missing[:5]}")
    if whole_mlps:
        warnings.warn(
            f"MLP nodes {whole_mlps} carry no neuron list ({NEURONS_KEY!r}): all their neurons "
            "are kept",
            stacklevel=2,
        )
    if uncovered:
        warnings.warn(
            f"nodes {uncovered[:5]} are out of the circuit but the unit map cannot ablate them",
            stacklevel=2,
        )
    if edge_level:
        warnings.warn(
            "the file is an edge-level circuit; only its nodes are kept (edges between kept "
            "nodes are all restored)",
            stacklevel=2,
        )
    return keep


# ----------------------------------------------------------------------------- files


def save_circuit(
    path: str | os.PathLike,
    unit_map: UnitMap,
    keep: Bool[Tensor, "n_units"],
    scores: Float[Tensor, "n_units"] | None = None,
    **options: Any,
) -> Path:
    """Write :func:`circuit_to_mib` (``options`` are its keyword arguments) as strict JSON,
    atomically; returns the path."""
    data = circuit_to_mib(unit_map, keep, scores, **options)
    atomic_write_text(path, json.dumps(data, allow_nan=False) + "\n")
    return Path(path)


def load_circuit(
    path: str | os.PathLike, unit_map: UnitMap | None = None
) -> Bool[Tensor, "n_units"]:
    """Read a circuit JSON file back to a keep vector (:func:`circuit_from_mib`)."""
    return circuit_from_mib(Path(path), unit_map)
