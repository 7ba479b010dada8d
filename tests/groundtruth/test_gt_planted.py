"""Planted models: structure, the defining behaviour of each kind, pruning, and mask recovery."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from subroutine_circuits.groundtruth.planted import (
    PlantedConfig,
    build_modular,
    build_planted,
    build_random,
    build_redundant,
)
from subroutine_circuits.groundtruth.prune import (
    Encoded,
    all_units,
    evaluate_ablations,
    greedy_prune,
)

SMALL = PlantedConfig(n_train=200)


@pytest.fixture(scope="module")
def modular():
    torch.set_num_threads(1)
    return build_modular(0, SMALL)


def _hand_eval(model, data, units):
    """Independent accuracy / loss of one zero-ablation config (plain TL hooks, one pass)."""
    from subroutine_circuits.models import ooo_logits

    def zero(idx):
        def fn(x, hook):
            x = x.clone()
            x[:, :, idx] = 0.0
            return x

        return fn

    hooks = []
    for layer in range(model.cfg.n_layers):
        for kind, name in (("head", "attn.hook_z"), ("neuron", "mlp.hook_post")):
            idx = [i for (lay, k, i) in units if lay == layer and k == kind]
            if idx:
                hooks.append((f"blocks.{layer}.{name}", zero(idx)))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = ooo_logits(model, data.tokens, data.lengths)
    acc = float((logits.argmax(-1) == data.odd).float().mean())
    return acc, float(F.cross_entropy(logits, data.odd))


def test_evaluate_ablations_matches_one_config_at_a_time(modular):
    model = modular.model
    data = Encoded.of(modular.splits["val"]["composite"][:30], modular.tokenizer)
    units = all_units(model)
    configs = [set(), {units[0]}, set(units[::3]), set(units)]
    accs, losses = evaluate_ablations(model, data, configs, max_rows=50)  # several passes
    for cfg, acc, loss in zip(configs, accs, losses):
        want_acc, want_loss = _hand_eval(model, data, cfg)
        assert acc == pytest.approx(want_acc, abs=1e-6)
        assert loss == pytest.approx(want_loss, rel=1e-4)


def test_modular_truth_is_block_structured(modular):
    a, b = modular.subroutines
    lay = modular.layout
    ta, tb = modular.truth[a], modular.truth[b]
    assert ta and tb and not (ta & tb)
    assert ta <= lay.units("A") and tb <= lay.units("B")
    # compacted: every unit of the joined model is planted for A or for B, except for slots
    # kept only to give each layer the same width
    vec = modular.truth_vector(a)
    assert vec.shape == (len(all_units(modular.model)),) and int(vec.sum()) == len(ta)
    from subroutine_circuits.adapters.transformer_lens import tl_unit_map

    um = tl_unit_map(modular.model)
    assert um.units() == modular.units()
    assert torch.equal(modular.truth_vector(a, um), vec)
    with pytest.raises(ValueError, match="subroutine"):
        modular.truth_vector("nope")


def test_modular_blocks_compute_their_subroutine(modular):
    a, b = modular.subroutines
    m = modular.metrics["joined"]
    assert m["full_composite"] >= 0.9
    assert m["none_composite"] <= 0.4  # no bypass: every unit ablated -> near chance
    # block A alone solves A's partition and not B's; block B the reverse
    assert m[f"onlyA_partition_{a}"] >= 0.9 and m[f"onlyA_partition_{b}"] <= 0.45
    assert m[f"onlyB_partition_{b}"] >= 0.9 and m[f"onlyB_partition_{a}"] <= 0.45
    for part in ("part_A", "part_B"):
        info = modular.metrics[part]
        assert info["val_acc_pruned"] >= 0.9
        assert info["n_kept"] < info["n_units"]


def test_greedy_prune_removes_dead_units_and_keeps_only_needed_ones(modular):
    from subroutine_circuits.groundtruth.prune import compact_part

    model = modular.model
    a = modular.subroutines[0]
    data = Encoded.of(modular.splits["val"][f"sub_{a}"][:40], modular.tokenizer)
    # plant dead units: keep the full architecture but zero every block-B unit
    live = set(all_units(model)) - modular.layout.units("B")
    dead_model, _, _ = compact_part(model, live, keep_width=True)
    res = greedy_prune(dead_model, data, tol=0.05, loss_tol=0.1, min_effect=0.02)
    assert res.kept and not (res.kept & modular.layout.units("B"))
    removed = set(all_units(dead_model)) - res.kept
    base_acc, base_loss = _hand_eval(dead_model, data, set())
    acc, loss = _hand_eval(dead_model, data, removed)
    assert res.base_acc == pytest.approx(base_acc, abs=1e-6)
    assert res.pruned_acc == pytest.approx(acc, abs=1e-6)
    assert res.pruned_loss == pytest.approx(loss, rel=1e-4)
    for u in res.kept:  # every kept unit is needed: its removal costs at least min_effect
        _, loss_u = _hand_eval(dead_model, data, removed | {u})
        assert loss_u - loss >= 0.02 - 1e-5
        assert res.loss_necessity[u] == pytest.approx(loss_u - loss, abs=1e-4)
    # without the minimum-effect rule the kept set stays within the tolerances
    res0 = greedy_prune(dead_model, data, tol=0.05, loss_tol=0.1, min_effect=0.0)
    acc0, loss0 = _hand_eval(dead_model, data, set(all_units(dead_model)) - res0.kept)
    assert acc0 >= base_acc - 0.05 - 1e-6 and loss0 <= base_loss + 0.1 + 1e-5
    assert res.kept <= res0.kept


def test_mask_from_existing_engine_recovers_block(modular):
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.search import encode, train_mask
    from subroutine_circuits.groundtruth.scoring import mask_row

    a = modular.subroutines[0]
    adapter = as_adapter(modular.model, tokenizer=modular.tokenizer, pool="last")
    train = encode(adapter, modular.splits["train"][f"sub_{a}"])
    mask = train_mask(adapter, train, MaskSearchConfig(), {}, seed=0)
    row = mask_row(modular, a, mask)
    assert row["roc_auc"] >= 0.95
    assert row["precision"] >= 0.8 and row["recall"] >= 0.8


def test_joined_model_round_trips_through_checkpoint(modular, tmp_path):
    from subroutine_circuits.models import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "m", modular.model, modular.tokenizer, {"kind": "modular"})
    loaded, _, _ = load_checkpoint(tmp_path / "m")
    tokens = torch.randint(1, modular.tokenizer.vocab_size, (2, 6))
    torch.testing.assert_close(loaded(tokens), modular.model(tokens))


@pytest.fixture(scope="module")
def redundant():
    torch.set_num_threads(1)
    return build_redundant(0, SMALL)


def test_redundant_model_holds_two_disjoint_copies_of_each_subroutine(redundant):
    p = redundant
    a, b = p.subroutines
    assert set(p.parts) == {"A1", "A2", "B1", "B2"}
    # the truth of A is the union of its two copies, disjoint from B's
    assert p.truth[a] == p.parts["A1"]["units"] | p.parts["A2"]["units"]
    assert not (p.parts["A1"]["units"] & p.parts["A2"]["units"])
    assert not (p.truth[a] & p.truth[b])
    assert p.expected == "not compositional"
    # redundancy, measured independently with plain zero-ablation hooks: either copy of A
    # alone (the other copy and all of B ablated) solves sub_A; ablating both copies does not
    data = Encoded.of(p.splits["val"][f"sub_{a}"], p.tokenizer)
    every = set(all_units(p.model))
    acc_1, loss_1 = _hand_eval(p.model, data, every - p.parts["A1"]["units"])
    acc_2, loss_2 = _hand_eval(p.model, data, every - p.parts["A2"]["units"])
    acc_none, _ = _hand_eval(p.model, data, p.truth[a])
    assert acc_1 >= 0.8 and acc_2 >= 0.8
    assert acc_none <= 0.45
    # the copies are exact copies: either one alone gives the same answers
    assert acc_1 == acc_2 and loss_1 == pytest.approx(loss_2, abs=1e-5)


def test_redundancy_check_matches_hand_hooks(redundant):
    """``redundancy_check`` under zero ablation equals plain hooks: each partition with one copy
    ablated, and each copy alone on its subroutine; ``ok`` is its threshold rule."""
    from subroutine_circuits.groundtruth.truth import redundancy_check

    p = redundant
    check = redundancy_check(p, SMALL)
    assert set(check) == {SMALL.ablation, "zero"}
    zero = check["zero"]
    every = set(all_units(p.model))
    worst = 0.0
    for s in p.subroutines:
        data = Encoded.of(p.splits["val"][f"partition_{s}"], p.tokenizer)
        full, _ = _hand_eval(p.model, data, set())
        assert zero["partitions"][s]["full"] == pytest.approx(full)
        for name, part in p.parts.items():
            acc, _ = _hand_eval(p.model, data, part["units"])
            assert zero["partitions"][s][f"without_{name}"] == pytest.approx(acc)
            worst = max(worst, full - acc)
    assert zero["max_drop"] == pytest.approx(worst)
    alone_ok = True
    for name, part in p.parts.items():
        (s,) = part["computes"]
        data = Encoded.of(p.splits["val"][f"sub_{s}"], p.tokenizer)
        acc, _ = _hand_eval(p.model, data, every - part["units"])
        assert zero["alone"][f"{name}_sub_{s}"] == pytest.approx(acc)
        alone_ok &= acc >= SMALL.sufficient_acc
    # minimal sufficient subnetworks, by hand: every subset of both copies kept alone, the
    # pass's stopping rule, and the partition with each minimal one ablated
    minimal_ok = True
    for s in p.subroutines:
        units = sorted(p.truth[s])
        sub = Encoded.of(p.splits["val"][f"sub_{s}"], p.tokenizer)
        part = Encoded.of(p.splits["val"][f"partition_{s}"], p.tokenizer)
        subsets = [frozenset(c) for r in range(len(units) + 1)
                   for c in itertools.combinations(units, r)]  # fmt: skip
        acc = {x: _hand_eval(p.model, sub, every - x)[0] for x in subsets}
        top = max(1 - SMALL.minimal_tol, SMALL.sufficient_acc)
        want = {
            x for x in subsets
            if acc[x] >= SMALL.sufficient_acc and all(acc[x - {u}] < min(acc[x], top) for u in x)
        }  # fmt: skip
        got = zero["minimal"][s]
        assert got["checked"] and got["n_subsets"] == len(subsets)
        assert {frozenset(map(tuple, m["units"])) for m in got["minimal"]} == want
        full, _ = _hand_eval(p.model, part, set())
        for m in got["minimal"]:
            ablated, _ = _hand_eval(p.model, part, set(map(tuple, m["units"])))
            assert m["partition_drop"] == pytest.approx(full - ablated)
        minimal_ok &= got["max_drop"] <= SMALL.redundant_max_drop
    assert zero["ok"] == (worst <= SMALL.redundant_max_drop and minimal_ok and alone_ok)
    # the model was kept because the check holds under the study's ablation
    assert check[SMALL.ablation]["ok"] and p.metrics["redundancy_check"][SMALL.ablation]["ok"]


def test_minimal_subnetworks_follows_the_pass_stopping_rule():
    """A subnetwork counts as minimal exactly when the minimality pass could stop in it: every
    single removal falls below ``min(acc(S), max(1 - tol, min_acc))`` (hand-made accuracies)."""
    from subroutine_circuits.groundtruth.truth import minimal_subnetworks

    x, y, z = (0, "head", 0), (0, "head", 1), (0, "head", 2)
    accs = {
        frozenset(): 0.25, frozenset({x}): 0.99, frozenset({y}): 0.95, frozenset({z}): 0.5,
        frozenset({x, y}): 1.0, frozenset({x, z}): 0.97, frozenset({y, z}): 0.93,
        frozenset({x, y, z}): 1.0,
    }  # fmt: skip
    every = {x, y, z, (0, "head", 3)}

    class Fake:
        def evaluate(self, problems, configs):
            if problems == "sub":  # a config is the set of ablated units
                return [accs[frozenset(every - set(c)) & frozenset({x, y, z})] for c in configs], []
            return [0.9 - 0.1 * len(set(c)) for c in configs], []

    out = minimal_subnetworks(Fake(), [x, y, z], every, "sub", "partition", 0.9, 0.02)
    # {x,y}: removing y leaves 0.99 >= min(1.0, 0.98), the pass removes it; {x,z}: removing z
    # leaves 0.99 >= 0.97; {y,z}: removing z leaves 0.95 >= 0.93; {x}, {y}: minimal
    assert {frozenset(m["units"]) for m in out["minimal"]} == {frozenset({x}), frozenset({y})}
    assert out["n_sufficient"] == 6 and out["n_subsets"] == 8
    assert [m["partition_drop"] for m in out["minimal"]] == pytest.approx([0.1, 0.1])
    assert out["max_drop"] == pytest.approx(0.1)
    # a tolerance of 0: the pass started at 1.0 keeps {x, y} (either removal costs accuracy);
    # {x, z} (0.97, 0.99 without z) is still not minimal
    out0 = minimal_subnetworks(Fake(), [x, y, z], every, "sub", "partition", 0.9, 0.0)
    got0 = {frozenset(m["units"]) for m in out0["minimal"]}
    assert got0 == {frozenset({x}), frozenset({y}), frozenset({x, y})}
    # with a success threshold of 0.96, y alone is not sufficient and {x,y}, {x,z} are not
    # minimal (x alone is enough); {x} is the only minimal one
    out96 = minimal_subnetworks(Fake(), [x, y, z], every, "sub", "partition", 0.96, 0.02)
    assert [frozenset(m["units"]) for m in out96["minimal"]] == [frozenset({x})]


def test_redundant_build_gives_up_with_a_clear_error(modular):
    """A redundant model whose check cannot hold (here: too many units to enumerate) is not
    returned: after ``redundant_tries`` draws the build raises, naming the check."""
    from subroutine_circuits.groundtruth.planted import RedundantBuildError

    cfg = PlantedConfig(n_train=200, redundant_max_units=1, redundant_tries=1)
    with pytest.raises(RedundantBuildError, match="redundancy check"):
        build_redundant(0, cfg, splits=modular.splits)
    with pytest.raises(ValueError, match="redundant_part.*d_vocab"):
        PlantedConfig(redundant_part={"d_vocab": 3}).validate()


def test_minimality_pass_ends_in_a_minimal_subnetwork_of_a_redundant_model(redundant):
    """A mask holding both copies of A ends in one of ``redundancy_check``'s minimal
    subnetworks, whose ablation leaves A's partition within the margin, and is 1-minimal:
    removing any one of its units costs more than the tolerance (plain zero hooks)."""
    from subroutine_circuits.adapters import as_adapter
    from subroutine_circuits.experiment.converge import MaskRun
    from subroutine_circuits.experiment.search import prune_run
    from subroutine_circuits.masks import UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    p = redundant
    a = p.subroutines[0]
    adapter = as_adapter(p.model, tokenizer=p.tokenizer, pool="last")
    um = adapter.unit_map(kinds=("head", "neuron"))
    units = [tuple(u) for u in um.units()]
    keep = torch.tensor([u in p.truth[a] for u in units])
    val = adapter.encode_problems(list(p.splits["val"][f"sub_{a}"]))
    run = MaskRun(UnitMask.fixed(um, keep, "zero"), 0.0, 1.0, 10, 10, None, False)
    tol = SMALL.minimal_tol
    out = prune_run(adapter, val, run, Ablator("zero"), tol, min_acc=SMALL.sufficient_acc)
    kept = {u for u, k in zip(units, out.mask.flat_binary().tolist()) if k}
    minimal = p.metrics["redundancy_check"]["zero"]["minimal"][a]["minimal"]
    assert kept in [set(map(tuple, m["units"])) for m in minimal], kept
    part = Encoded.of(p.splits["val"][f"partition_{a}"], p.tokenizer)
    drop = _hand_eval(p.model, part, set())[0] - _hand_eval(p.model, part, kept)[0]
    assert drop <= SMALL.redundant_max_drop
    data = Encoded.of(p.splits["val"][f"sub_{a}"], p.tokenizer)
    every = set(units)
    start, _ = _hand_eval(p.model, data, every - p.truth[a])
    assert out.pruned["val_acc_before"] == pytest.approx(start)
    now, _ = _hand_eval(p.model, data, every - kept)
    assert out.val_acc == pytest.approx(now) and now >= start - tol - 1e-9
    for u in kept if len(kept) > 1 else ():
        acc, _ = _hand_eval(p.model, data, every - (kept - {u}))
        assert acc < start - tol, f"{u} could still go"


def test_random_init_and_bad_kind(modular):
    r = build_random(0, SMALL, splits=modular.splits, like=modular.model)
    assert r.truth is None and r.kind == "random_init"
    assert r.model.cfg.d_model == modular.model.cfg.d_model
    assert r.model.cfg.n_heads == modular.model.cfg.n_heads
    assert r.metrics["joined"]["full_composite"] <= 0.45
    with pytest.raises(ValueError, match="kind"):
        build_planted("nope", 0, SMALL)
    with pytest.raises(ValueError, match="n_train"):
        build_planted("modular", 0, PlantedConfig(n_train=0))
