"""The one base-model training loop (models.loop): steps, stop reasons, best weights, configs."""

from __future__ import annotations

import itertools

import pytest
import torch

from subroutine_circuits.models.cnn_train import CNNTrainConfig
from subroutine_circuits.models.loop import (
    BaseTrainer,
    EarlyStopConfig,
    EvaluatedTrainer,
    LoopConfig,
)
from subroutine_circuits.models.pretraining import PretrainConfig
from subroutine_circuits.models.simclr import SimCLRConfig
from subroutine_circuits.models.train import TrainConfig


class _Quadratic(BaseTrainer):
    """Minimise ||w - target||^2 with plain SGD; every batch is the step number."""

    def __init__(self, total: int, stop_at: int | None = None, **kwargs):
        self.w = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.w.weight)
        optim = torch.optim.SGD(self.w.parameters(), lr=0.1)
        super().__init__(self.w, optim, total, **kwargs)
        self.stop_at, self.seen, self.modes = stop_at, [], []

    def batches(self):
        return itertools.count()

    def loss(self, batch):
        self.seen.append(batch)
        self.modes.append(self.w.training)
        return ((self.w.weight - 3.0) ** 2).sum(), None

    def after_step(self, batch, loss, info, bar, last, over_time):
        return "hook" if self.step == self.stop_at else None


def test_steps_stop_reasons_and_modes():
    t = _Quadratic(7)
    assert t.run() == "max_steps" and t.step == 7 and t.seen == list(range(7))
    assert all(t.modes) and not t.w.training  # train mode in steps, eval mode after
    # SGD on (w - 3)^2 with lr 0.1: w_k = 3 (1 - 0.8^k), computed independently
    assert float(t.w.weight.detach()) == pytest.approx(3 * (1 - 0.8**7), rel=1e-5)
    t = _Quadratic(7, stop_at=3)
    assert t.run() == "hook" and t.step == 3
    t = _Quadratic(10**9, time_limit_s=1e-9)
    assert t.run() == "time_limit" and t.step == 1


def test_non_finite_loss_is_refused_with_advice():
    class Bad(_Quadratic):
        def loss(self, batch):
            return self.w.weight.sum() * float("nan"), None

    with pytest.raises(ValueError, match="NaN/inf loss .* at step 0: lower the rate"):
        Bad(3, advice="the rate").run()


class _Scripted(EvaluatedTrainer):
    """Validation accuracies come from a script; the weight counts the steps."""

    def __init__(self, accs, patience, target_val_acc):
        w = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(w.weight)
        optim = torch.optim.SGD(w.parameters(), lr=1.0)
        cfg = EarlyStopConfig(batch_size=2, eval_every=2, patience=patience, max_steps=100,
                              target_val_acc=target_val_acc, warmup_steps=0, grad_clip=None,
                              progress=False)  # fmt: skip
        super().__init__(w, optim, cfg, 8, params=list(w.parameters()), advice="lr")
        self.accs = iter(accs)

    def batches(self):
        return itertools.count()

    def loss(self, batch):
        return -self.model.weight.sum(), (1, 2)  # each step adds 1 to the weight

    def validate(self):
        return next(self.accs), None


def test_evaluated_trainer_keeps_first_best_and_stops():
    t = _Scripted([0.3, 0.5, 0.7, 0.7, 0.6, 0.2], patience=3, target_val_acc=None)
    r = t.fit()
    assert r.stop_reason == "patience" and r.steps == 10
    assert r.best_val_acc == 0.7 and r.best_step == 4  # the first of the tied bests
    assert float(t.model.weight.detach()) == 4.0  # its weights are restored
    assert [h["step"] for h in r.history] == [0, 2, 4, 6, 8, 10]
    assert [h["epoch"] for h in r.history] == [0, 0.5, 1, 1.5, 2, 2.5]  # 4 steps an epoch
    assert t.history[1]["train_acc"] == 0.5 and t.history[0]["train_acc"] != 0.5  # nan at step 0
    t = _Scripted([0.3, 0.95], patience=9, target_val_acc=0.9)
    assert t.run() == "target_val_acc" and t.step == 2
    t = _Scripted([0.95], patience=9, target_val_acc=0.9)
    assert t.run() == "target_val_acc" and t.step == 0  # the initial weights already suffice


@pytest.mark.parametrize("cls", [TrainConfig, PretrainConfig, CNNTrainConfig, SimCLRConfig])
def test_every_config_shares_the_loop_settings(cls):
    assert issubclass(cls, LoopConfig)
    bad_values = [("lr", 0.0), ("weight_decay", -1.0), ("batch_size", 0), ("time_limit_s", 0.0),
                  ("grad_clip", 0.0), ("warmup_steps", -1)]  # fmt: skip
    for field, bad in bad_values:
        with pytest.raises(ValueError, match=f"{cls.__name__}.{field} must be"):
            cls(**{field: bad}).validate()
