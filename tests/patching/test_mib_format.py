"""Circuits out and in, in the MIB / EAP-IG circuit JSON format."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from subroutine_circuits import api
from subroutine_circuits.adapters import tl_unit_map
from subroutine_circuits.masks import UnitGroup, UnitMap, UnitMask
from subroutine_circuits.patching.mib_format import (
    circuit_from_mib,
    circuit_to_mib,
    load_circuit,
    save_circuit,
)

# A 2-layer, 2-head model's graph as EAP-IG's ``Graph.to_json`` writes it (edge-level attribution,
# so no node scores): nodes in model order, edges in the order ``Graph.from_model`` adds them
# (every earlier node of the residual stream into each head's q/k/v, then into the MLP, and
# finally everything into logits). The circuit: heads a0.h1 and a1.h0 and the MLP m0.
EAP_NODES = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"]
EAP_EDGES = [
    *(f"input->a0.h{h}<{x}>" for h in (0, 1) for x in "qkv"),
    "input->m0",
    "a0.h0->m0",
    "a0.h1->m0",
    *(
        f"{s}->a1.h{h}<{x}>"
        for s in ("input", "a0.h0", "a0.h1", "m0")
        for h in (0, 1)
        for x in "qkv"
    ),
    *(f"{s}->m1" for s in ("input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1")),
    *(f"{s}->logits" for s in ("input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1")),
]
IN_CIRCUIT = {"input", "a0.h1", "m0", "a1.h0", "logits"}


def _eap_fixture() -> dict:
    edges = {}
    for i, name in enumerate(EAP_EDGES):
        src, dst = name.split("<")[0].split("->")
        edges[name] = {"score": 0.01 * i, "in_graph": src in IN_CIRCUIT and dst in IN_CIRCUIT}
    return {
        "cfg": {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8},
        "nodes": {name: {"in_graph": name in IN_CIRCUIT} for name in EAP_NODES},
        "edges": edges,
    }


def _small_map(d_mlp: int = 3) -> UnitMap:
    groups = []
    for layer in range(2):
        groups.append(UnitGroup(f"blocks.{layer}.attn.hook_z", 2, 2, layer, "head", (3,)))
        groups.append(UnitGroup(f"blocks.{layer}.mlp.hook_post", 2, d_mlp, layer, "neuron"))
    return UnitMap(groups)


def test_export_matches_eap_ig_layout():
    fixture = _eap_fixture()
    assert len(EAP_EDGES) == 46
    um = _small_map()
    # order: a0.h0 a0.h1 | m0: 3 neurons | a1.h0 a1.h1 | m1: 3 neurons
    keep = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    out = circuit_to_mib(um, keep, neuron_detail=False, d_model=8)
    assert set(out) == set(fixture) | {"subroutine_circuits"}
    assert out["cfg"] == fixture["cfg"]
    assert list(out["nodes"]) == EAP_NODES and list(out["edges"]) == EAP_EDGES
    assert out["nodes"] == fixture["nodes"]  # no scores given: nodes carry in_graph only
    assert {k: e["in_graph"] for k, e in out["edges"].items()} == {
        k: e["in_graph"] for k, e in fixture["edges"].items()
    }
    detailed = circuit_to_mib(um, keep, torch.arange(10.0))
    assert set(detailed) - set(out) == {"mlp_neurons", "mlp_neuron_scores"}
    assert detailed["mlp_neurons"] == {"m0": [1], "m1": []}
    assert detailed["nodes"]["m0"] == {"in_graph": True, "score": 2.0 + 3.0 + 4.0}
    assert detailed["nodes"]["a1.h1"] == {"in_graph": False, "score": 6.0}
    assert "score" not in detailed["nodes"]["input"]


def test_import_eap_ig_fixture_keeps_whole_mlps():
    um = _small_map()
    with pytest.warns(UserWarning, match="no neuron list") as rec:
        keep = circuit_from_mib(_eap_fixture(), um)
    assert len(rec) == 1
    assert keep.tolist() == [False, True, True, True, True, True, False, False, False, False]


def test_round_trip_and_ablation(tmp_path, tiny_model, tiny_tokens):
    um = tl_unit_map(tiny_model)
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(um.n_units, generator=g) < 0.4
    keep[um.offsets()[3] :] = False  # m1 empty: the node is out of the graph
    scores = torch.randn(um.n_units, generator=g)
    mask = UnitMask.fixed(um, keep, "zero")
    path = api.export_circuit(mask, tmp_path / "c.json", scores=scores, model=tiny_model)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["cfg"] == {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 32}
    assert data["nodes"]["m1"]["in_graph"] is False
    for name, e in data["edges"].items():
        src, dst = name.split("<")[0].split("->")
        assert e["in_graph"] == (data["nodes"][src]["in_graph"] and data["nodes"][dst]["in_graph"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = api.import_circuit(path, um)
        assert torch.equal(load_circuit(path), keep)  # unit map from the file's metadata
    assert torch.equal(got, keep)
    with UnitMask.fixed(um, keep, "zero").applied(tiny_model):
        want = tiny_model(tiny_tokens)
    with UnitMask.fixed(um, got, "zero").applied(tiny_model):
        again = tiny_model(tiny_tokens)
    assert torch.equal(want, again)
    assert not torch.equal(want, tiny_model(tiny_tokens))  # the circuit does ablate something


def test_heads_only_map_and_save(tmp_path):
    um = UnitMap([UnitGroup(f"blocks.{la}.attn.hook_z", 2, 3, la, "head", (3,)) for la in (0, 1)])
    keep = torch.tensor([1, 0, 0, 0, 0, 1], dtype=torch.bool)
    path = save_circuit(tmp_path / "h.json", um, keep, n_layers=3)
    data = json.loads(path.read_text())
    assert data["nodes"]["m0"]["in_graph"] and data["nodes"]["a2.h1"]["in_graph"]  # never ablated
    assert "mlp_neurons" not in data
    assert torch.equal(load_circuit(path, um), keep)
    data["nodes"]["a2.h1"]["in_graph"] = False
    with pytest.warns(UserWarning, match="cannot ablate"):
        assert torch.equal(circuit_from_mib(data, um), keep)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["nodes"].update({"z3": {"in_graph": True}}), "unknown node name 'z3'"),
        (lambda d: d["nodes"].update({"a0.h7": {"in_graph": True}}), "head 7 out of range"),
        (lambda d: d["nodes"].update({"m5": {"in_graph": False}}), "layer 5 outside"),
        (lambda d: d["edges"].update({"a0.h0->a1.h1": {}}), "need <q|k|v>"),
        (lambda d: d["edges"].update({"a0.h0=>m1": {}}), "bad edge name"),
        (lambda d: d.pop("nodes"), "missing key 'nodes'"),
        (lambda d: d["nodes"].update({"a1.h0": {"score": 1.0}}), "'a1.h0' has no 'in_graph'"),
        (lambda d: d["nodes"].pop("m1"), r"no node .*\['m1'\]"),
        (lambda d: d["cfg"].update({"n_heads": 3}), "does not fit"),
        (lambda d: d.update({"mlp_neurons": {"m0": [0, 9]}}), "indices < 3"),
    ],
)
def test_bad_input(edit, match):
    data = _eap_fixture()
    edit(data)
    with pytest.raises(ValueError, match=match):
        circuit_from_mib(data, _small_map())


def test_export_errors():
    um = _small_map()
    with pytest.raises(ValueError, match="keep has 3 entries"):
        circuit_to_mib(um, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no MIB node"):
        circuit_to_mib(UnitMap([UnitGroup("hook_c1", 1, 5, 0, "channel")]), torch.ones(5))
    with pytest.raises(ValueError, match="n_layers=1"):
        circuit_to_mib(um, torch.ones(10, dtype=torch.bool), n_layers=1)
