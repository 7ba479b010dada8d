"""The minimality pass of the mask search (``mask.prune``): masks lose the units their
subroutine's validation accuracy does not need, checked against a hand-written zero hook."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("param", ["hard_concrete", "continuous", "fixed"])
def test_drop_turns_off_only_the_given_units(param):
    """``drop`` flips exactly the requested kept units to off, whatever the parametrisation."""
    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import tl_unit_map
    from subroutine_circuits.masks import MaskConfig, UnitMask

    um = tl_unit_map(make_tiny_transformer(seed=1))
    g = torch.Generator().manual_seed(3)
    if param == "fixed":
        mask = UnitMask.fixed(um, torch.rand(um.n_units, generator=g) < 0.7)
    else:
        mask = UnitMask(um, MaskConfig(parametrization=param, init=1.0))
        with torch.no_grad():  # scores on both sides of the threshold
            for p in mask.parts:
                for t in p.parameters():
                    t.copy_(torch.randn(t.shape, generator=g) * 3)
    before = mask.flat_binary().clone()
    off = before & (torch.rand(um.n_units, generator=g) < 0.5)
    assert off.any()
    mask.drop(off)
    assert torch.equal(mask.flat_binary(), before & ~off)


def _zero_hook_accuracy(model, data, keep, um) -> float:
    """OOO accuracy with the units where ``keep`` is False zeroed, by plain forward hooks."""
    from subroutine_circuits.models.readout import ooo_logits

    hooks, start = [], 0
    for g in um.groups:
        k = keep[start : start + g.size].float()
        start += g.size

        def fn(x, hook, k=k):
            shape = [1, 1, -1] + [1] * (x.dim() - 3)
            return x * k.view(*shape).to(x.dtype)

        hooks.append((g.hook_name, fn))
    with model.hooks(fwd_hooks=hooks), torch.no_grad():
        logits = ooo_logits(model, data.inputs["tokens"], data.inputs["lengths"], "last")
    return float((logits.argmax(-1) == data.odd).float().mean())


def test_prune_run_drops_dead_units_and_keeps_accuracy_within_tolerance():
    """Units whose output weights are zero are all dropped; the pruned mask's accuracy,
    recomputed by a hand-written hook, equals the recorded one and is within tolerance of the
    mask before pruning; nothing outside the original mask is added."""
    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.experiment.converge import MaskRun
    from subroutine_circuits.experiment.search import prune_run
    from subroutine_circuits.masks import MaskConfig, UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    model = make_tiny_transformer(seed=5)
    dead_heads, dead_neurons = [(0, 1), (1, 3)], [(0, 7), (1, 2), (1, 40)]
    with torch.no_grad():
        for layer, h in dead_heads:
            model.blocks[layer].attn.W_O[h].zero_()
        for layer, n in dead_neurons:
            model.blocks[layer].mlp.W_out[n].zero_()
    um = tl_unit_map(model)
    index = {u: i for i, u in enumerate(um.units())}
    dead = [index[(layer, "head", h)] for layer, h in dead_heads]
    dead += [index[(layer, "neuron", n)] for layer, n in dead_neurons]

    g = torch.Generator().manual_seed(0)
    toks = torch.randint(1, 50, (40, 4, 7), generator=g)
    data = EncodedProblems({"tokens": toks, "lengths": torch.full((40, 4), 7)},
                           torch.randint(0, 4, (40,), generator=g))  # fmt: skip
    mask = UnitMask(um, MaskConfig(parametrization="hard_concrete", init=3.0, ablation="zero"))
    assert bool(mask.flat_binary().all())
    run = MaskRun(mask, 0.0, 1.0, 10, 10, None, False)
    before = mask.flat_binary().clone()
    start = _zero_hook_accuracy(model, data, before, um)

    tol = 0.05
    out = prune_run(as_adapter(model, pool="last"), data, run, Ablator("zero"), tol)
    after = out.mask.flat_binary()
    assert not bool((after & ~before).any())
    assert not bool(after[dead].any()), "a unit with zero output weights was kept"
    assert out.pruned["units_dropped"] == int(before.sum() - after.sum()) > len(dead)
    assert out.pruned["val_acc_before"] == pytest.approx(start)
    independent = _zero_hook_accuracy(model, data, after, um)
    assert out.val_acc == pytest.approx(independent)
    assert independent >= start - tol - 1e-9
    assert out.density == pytest.approx(float(after.float().mean()))


def test_prune_is_refused_for_weight_masks():
    """``mask.prune`` drops units, so a weight-mask search with it is refused by name."""
    from subroutine_circuits.experiment.config import MaskSearchConfig
    from subroutine_circuits.experiment.search import search_all
    from subroutine_circuits.masks.ablator import Ablator

    cfg = MaskSearchConfig(kind="weight", prune=True)
    with pytest.raises(ValueError, match="mask.prune"):
        search_all(None, {"a": None}, {"a": None}, cfg, [0], Ablator("zero"))


def test_prefix_sizes_cover_small_sizes_and_the_whole_ranking():
    """Every size up to 8, then growing sizes, always ending at k (all units but one tried)."""
    from subroutine_circuits.experiment.search import prefix_sizes

    assert prefix_sizes(0) == [] and prefix_sizes(3) == [1, 2, 3]
    for k in (9, 40, 70, 1000):
        s = prefix_sizes(k)
        assert s[:8] == list(range(1, 9)) and s[-1] == k
        assert all(b > a for a, b in zip(s, s[1:])) and all(
            b <= 1.25 * a + 1 for a, b in zip(s, s[1:])
        )
        assert len(s) <= 8 + 5 * max(1, k // 8).bit_length()


def _random_problems(model_seed: int, data_seed: int, n: int = 60):
    """A tiny transformer, its unit map, ``n`` random 4-stimulus problems and its adapter."""
    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems

    model = make_tiny_transformer(seed=model_seed)
    g = torch.Generator().manual_seed(data_seed)
    toks = torch.randint(1, 50, (n, 4, 7), generator=g)
    data = EncodedProblems({"tokens": toks, "lengths": torch.full((n, 4), 7)},
                           torch.randint(0, 4, (n,), generator=g))  # fmt: skip
    return model, tl_unit_map(model), data, as_adapter(model, pool="last")


def test_prune_keeps_a_usable_mask_usable():
    """With ``min_acc`` just below the mask's accuracy the pass may not take the accuracy under
    it, although ``tolerance`` alone would allow that (a usable mask stays usable)."""
    from subroutine_circuits.experiment.converge import MaskRun
    from subroutine_circuits.experiment.search import prune_run
    from subroutine_circuits.masks import MaskConfig, UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    _, um, data, adapter = _random_problems(model_seed=6, data_seed=1)

    def pruned(min_acc):
        mask = UnitMask(um, MaskConfig(parametrization="hard_concrete", init=3.0))
        run = MaskRun(mask, 0.0, 1.0, 10, 10, None, False)
        return prune_run(adapter, data, run, Ablator("zero"), 0.5, min_acc=min_acc)

    loose = pruned(0.0)
    start = loose.pruned["val_acc_before"]
    assert loose.val_acc < start - 0.01  # tolerance 0.5 lets the accuracy fall
    strict = pruned(start - 0.01)
    assert strict.val_acc >= start - 0.01


def test_finish_makes_small_masks_1_minimal_and_skips_large_ones():
    """After the pass, removing any one unit of a mask the finish ran on drops the accuracy
    (hand-written hook) below the floor; a mask larger than ``finish_max_units`` after the
    prefix rounds skips the finish, and the record says so."""
    from subroutine_circuits.experiment.converge import MaskRun
    from subroutine_circuits.experiment.search import prune_run
    from subroutine_circuits.masks import MaskConfig, UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    model, um, data, adapter = _random_problems(model_seed=7, data_seed=2)

    def run(**kw):
        mask = UnitMask(um, MaskConfig(parametrization="hard_concrete", init=3.0))
        return prune_run(adapter, data, MaskRun(mask, 0.0, 1.0, 10, 10, None, False),
                         Ablator("zero"), 0.0, **kw)  # fmt: skip

    out = run(finish_max_units=um.n_units)
    assert out.pruned["finish"] == "1-minimal"
    keep = out.mask.flat_binary()
    floor = out.pruned["val_acc_before"]  # tolerance 0
    assert _zero_hook_accuracy(model, data, keep, um) >= floor - 1e-6  # float32 accuracies
    assert int(keep.sum()) > 1  # (5 units here) so the 1-minimality loop below checks something
    for i in keep.nonzero().flatten().tolist():
        fewer = keep.clone()
        fewer[i] = False
        acc = _zero_hook_accuracy(model, data, fewer, um)
        assert acc < floor - 1e-6, f"unit {i} could still go"  # at least one problem lower
    skipped = run(finish_max_units=0)
    assert skipped.pruned["finish"].startswith("skipped") and skipped.pruned["finish_dropped"] == 0


def test_block_removable_counts_units_of_blocks_that_can_go():
    """A mask too large for the finish gets the block measure: its units split into 8 blocks in
    the order of the single-removal ranking, and the count equals the units of the blocks whose
    removal alone keeps the accuracy (hand-written hook) at or above the floor; a 1-minimal
    mask records 0."""
    import torch

    from subroutine_circuits.experiment.converge import MaskRun
    from subroutine_circuits.experiment.evaluate import fixed_accuracies
    from subroutine_circuits.experiment.search import PRUNE_BLOCKS, block_removable, prune_run
    from subroutine_circuits.masks import MaskConfig, UnitMask
    from subroutine_circuits.masks.ablator import Ablator

    model, um, data, adapter = _random_problems(model_seed=7, data_seed=2)
    keep = torch.ones(um.n_units, dtype=torch.bool)
    n = len(data)  # a floor half-way between two counts: no accuracy lies on it
    floor = (round(_zero_hook_accuracy(model, data, keep, um) * n) - 2.5) / n
    abl = Ablator("zero")
    got = block_removable(adapter, data, data, keep, floor, um, abl)
    # independent: the same ranking and blocks, each block's accuracy by plain hooks
    kept = keep.nonzero().flatten()
    single = []
    for i in kept.tolist():
        fewer = keep.clone()
        fewer[i] = False
        single.append(fixed_accuracies(adapter, data, fewer[None], um, abl)[0])
    order = kept[torch.sort(-torch.tensor(single), stable=True).indices]
    expected = 0
    for block in torch.tensor_split(order, PRUNE_BLOCKS):
        fewer = keep.clone()
        fewer[block] = False
        if _zero_hook_accuracy(model, data, fewer, um) >= floor:
            expected += len(block)
    assert got == expected and 0 <= got <= int(keep.sum())
    # the minimality pass hands over its own ranking instead of computing it again
    assert block_removable(adapter, data, data, keep, floor, um, abl, order=order) == expected

    def run(**kw):
        mask = UnitMask(um, MaskConfig(parametrization="hard_concrete", init=3.0))
        return prune_run(adapter, data, MaskRun(mask, 0.0, 1.0, 10, 10, None, False),
                         abl, 0.0, **kw)  # fmt: skip

    assert run(finish_max_units=um.n_units).pruned["block_removable"] == 0
    large = run(finish_max_units=0).pruned
    assert large["finish"].startswith("skipped") and large["block_removable"] >= 0


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_floor_evaluation_is_exact_where_it_matters(kind):
    """The minimality pass's floor-aware evaluation (rows leave once their errors rule the
    floor out) gives the whole evaluation's accuracy and loss, bit for bit, to every row that
    reaches the floor; every other row gets an accuracy below the floor and at least its true
    one (the bound at which it left), and an infinite loss; some rows leave before the last
    chunk of problems (the saving is real)."""
    from conftest import make_tiny_transformer

    from subroutine_circuits.adapters import as_adapter, tl_unit_map
    from subroutine_circuits.adapters.base import EncodedProblems
    from subroutine_circuits.experiment.batched import fixed_problem_chunk
    from subroutine_circuits.experiment.evaluate import fixed_accuracies_losses
    from subroutine_circuits.masks.ablator import Ablator, reference_ablator
    from subroutine_circuits.models.readout import ooo_logits

    model = make_tiny_transformer(seed=5)
    adapter = as_adapter(model, pool="last")
    um = tl_unit_map(model)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(1, 50, (150, 4, 7), generator=g)
    lens = torch.randint(4, 8, (150, 4), generator=g)
    with torch.no_grad():  # the full model solves every problem: removals cost accuracy
        odd = ooo_logits(model, toks, lens, "last").argmax(-1)
    data = EncodedProblems({"tokens": toks, "lengths": lens}, odd)
    assert fixed_problem_chunk(model, data, adapter) < len(data)  # several chunks
    density = torch.tensor([1.0, 0.97, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0])[:, None]
    keep = torch.rand(len(density), um.n_units, generator=g) < density
    abl = Ablator("zero") if kind == "zero" else reference_ablator(
        adapter, um, data.flat_inputs(), "mean")  # fmt: skip
    acc, loss = fixed_accuracies_losses(adapter, data, keep, um, abl)
    floor = 0.9
    got_acc, got_loss = fixed_accuracies_losses(adapter, data, keep, um, abl, floor)
    reach = acc >= floor
    assert reach.any() and (~reach).any()
    assert torch.equal(got_acc[reach], acc[reach]) and torch.equal(got_loss[reach], loss[reach])
    assert bool((got_acc[~reach] < floor).all()) and bool((got_acc[~reach] >= acc[~reach]).all())
    assert bool(torch.isinf(got_loss[~reach]).all())
    assert bool((got_acc[~reach] > acc[~reach]).any()), "no row left before the last chunk"
