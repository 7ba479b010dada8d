"""Training a HookedCNN on image OOO problems: learning, best-weight restore, shuffling, errors."""

from __future__ import annotations

import pytest
import torch

from subroutine_circuits.models.cnn import CNNConfig, HookedCNN
from subroutine_circuits.models.cnn_train import (
    CNNTrainConfig,
    as_image_split,
    cnn_ooo_accuracy,
    cnn_ooo_eval,
    make_toy_ooo,
    shuffle_problems,
    train_cnn_ooo,
)


def small_model(seed: int = 0) -> HookedCNN:
    cfg = CNNConfig(image_size=16, stem_channels=8, stage_widths=(8, 16),
                    stage_channels=(8, 16), stage_blocks=(1, 1), stage_strides=(1, 2),
                    d_hidden=32, d_embed=16, seed=seed)  # fmt: skip
    return HookedCNN(cfg)


@pytest.fixture(scope="module")
def toy():
    return make_toy_ooo(384, 16, seed=0), make_toy_ooo(128, 16, seed=1)


def test_toy_task_is_what_it_says():
    images, odd = make_toy_ooo(20, 16, seed=3)
    assert images.shape == (20, 4, 3, 16, 16) and odd.shape == (20,)
    x01 = images * 0.1 + 0.9
    assert float(x01.max()) == pytest.approx(1.0) and float(x01.min()) >= 0.0
    corner = x01[..., 0, 0]  # mostly white background
    assert float((corner == 1.0).float().mean()) > 0.8
    # the odd image's object pixel count differs in kind: plus signs have 4r+1 pixels, squares 8r
    ink = (x01 < 0.99).any(2).sum((-1, -2))  # [20, 4]
    for p in range(20):
        others = [int(ink[p, i]) for i in range(4) if i != int(odd[p])]
        is_square = [n % 8 == 0 and n % 4 != 1 for n in others]
        assert len(set(is_square)) == 1  # the three rule images are of one kind
        n_odd = int(ink[p, int(odd[p])])
        assert (n_odd % 8 == 0 and n_odd % 4 != 1) != is_square[0]


def test_learns_toy_task_and_restores_best(toy):
    train, val = toy
    model = small_model()
    before = cnn_ooo_accuracy(model, val)
    res = train_cnn_ooo(
        model,
        train,
        val,
        CNNTrainConfig(lr=3e-3, max_steps=120, eval_every=10, progress=False, target_val_acc=0.95),
    )
    assert before < 0.6
    assert res.best_val_acc >= 0.9  # chance is 0.25
    assert res.stop_reason == "target_val_acc"
    # the returned model carries the best weights: evaluating again gives the best accuracy
    acc, loss = cnn_ooo_eval(model, val)
    assert acc == pytest.approx(res.best_val_acc)
    best = max(res.history, key=lambda h: (h["val_acc"], -h["val_loss"]))
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)
    assert res.history[0]["step"] == 0 and res.steps == res.history[-1]["step"]
    assert not model.training


def test_seeded_and_loss_mode(toy):
    train, val = toy
    cfg = CNNTrainConfig(lr=2e-3, max_steps=6, eval_every=3, progress=False, early_stop="loss",
                         optimizer="adamw", weight_decay=0.01, seed=4)  # fmt: skip
    a, b = small_model(1), small_model(1)
    ra = train_cnn_ooo(a, train, val, cfg)
    rb = train_cnn_ooo(b, train, val, cfg)
    assert [h["val_loss"] for h in ra.history] == [h["val_loss"] for h in rb.history]
    losses = [h["val_loss"] for h in ra.history]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert ra.best_step == ra.history[best]["step"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_shuffle_problems_moves_odd_with_its_image():
    images = torch.arange(5 * 4, dtype=torch.float32).view(5, 4, 1, 1, 1).expand(5, 4, 3, 2, 2)
    odd = torch.tensor([0, 1, 2, 3, 1])
    g = torch.Generator().manual_seed(0)
    sh, new_odd = shuffle_problems(images, odd, g)
    for p in range(5):
        assert float(sh[p, new_odd[p], 0, 0, 0]) == float(images[p, odd[p], 0, 0, 0])
        assert sorted(sh[p, :, 0, 0, 0].tolist()) == images[p, :, 0, 0, 0].tolist()


def test_split_and_config_errors(toy):
    (images, odd), val = toy
    with pytest.raises(ValueError, match="must be \\[b, 4, c, h, w\\]"):
        as_image_split((images[0], odd))
    with pytest.raises(ValueError, match="odd indices"):
        as_image_split((images[:2], torch.tensor([0, 4])))
    with pytest.raises(ValueError, match="empty train split"):
        train_cnn_ooo(small_model(), (images[:0], odd[:0]), val)
    with pytest.raises(ValueError, match="must be \\(images, odd\\)"):
        as_image_split(images)

    class Problems:  # duck-typed like tasks.vision.ImageProblems
        def to_tensor(self):
            return images[:3]

        def odd_tensor(self):
            return odd[:3]

    got_images, got_odd = as_image_split(Problems())
    assert torch.equal(got_images, images[:3]) and torch.equal(got_odd, odd[:3])
    with pytest.raises(ValueError, match="optimizer"):
        CNNTrainConfig(optimizer="sgd").validate()
    with pytest.raises(ValueError, match="early_stop"):
        CNNTrainConfig(early_stop="auc").validate()
    bad = images[:8].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf loss"):
        train_cnn_ooo(small_model(), (bad, odd[:8]), val,
                      CNNTrainConfig(progress=False, shuffle_odd=False, max_steps=2))  # fmt: skip
