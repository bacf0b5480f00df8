"""two_phase options the command line relies on: a partial phase-1 freeze, no phase 2, BatchNorm modes."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import frostline as fl
from frostline import recipes


def _setup():
    fl.seed_everything(0)
    base = fl.wrap(
        nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8)), name="base"
    )
    model = fl.Sequential([base, nn.Linear(8, 3)])
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 6), dtype=np.float32), rng.integers(0, 3, 32)
    return model, base, x, y


KW = dict(loss="sparse_categorical_crossentropy", verbose=0, batch_size=8)


class Trainable(fl.callbacks.Callback):
    """The names of the base's trainable parameters at the start of every fit."""

    def __init__(self, base):
        super().__init__()
        self.base, self.seen = base, []

    def on_train_begin(self, logs=None):
        self.seen.append(
            sorted(n for n, p in self.base.module.named_parameters() if p.requires_grad)
        )


def test_freeze_selector_freezes_only_that_part_in_phase_1():
    model, base, x, y = _setup()
    spy = Trainable(base)
    r = recipes.two_phase(
        model,
        base,
        x,
        y,
        freeze=fl.select.first(1),
        unfreeze=1,
        phase1_epochs=1,
        phase2_epochs=1,
        callbacks=[spy],
        **KW,
    )
    assert r.freeze_plan.paths == ["0"]
    assert spy.seen[0] == ["1.bias", "1.weight", "3.bias", "3.weight"]
    assert model.last_verification.ok


def test_freeze_nothing_trains_everything_in_phase_1():
    model, base, x, y = _setup()
    spy = Trainable(base)
    r = recipes.two_phase(
        model,
        base,
        x,
        y,
        freeze=[],
        unfreeze=1,
        phase1_epochs=1,
        phase2_epochs=0,
        callbacks=[spy],
        **KW,
    )
    assert r.freeze_plan.changes == [] and len(spy.seen[0]) == 6


def test_phase2_epochs_zero_stops_after_phase_1():
    model, base, x, y = _setup()
    spy = Trainable(base)
    r = recipes.two_phase(
        model, base, x, y, unfreeze=2, phase1_epochs=2, phase2_epochs=0, callbacks=[spy], **KW
    )
    assert len(spy.seen) == 1 and r.history["phase"] == [1, 1] and r.phase2.epoch == []
    assert not r.unfreeze_plan.applied and r.unfreeze_plan.paths == [
        "1",
        "3",
    ]  # what phase 2 would do
    assert base.trainable_weights == [] and model.learning_rate == 1e-3


@pytest.mark.parametrize(
    ("given", "mode"), [(True, "inference"), ("batch_stats", "batch_stats"), (False, "auto")]
)
def test_bn_inference_takes_a_mode(given, mode):
    from frostline.core import batchnorm

    model, base, x, y = _setup()
    recipes.two_phase(
        model, base, x, y, unfreeze=3, phase1_epochs=1, phase2_epochs=1, bn_inference=given, **KW
    )
    assert batchnorm.mode_of(base.module[1]) == mode


def test_bad_options():
    model, base, x, y = _setup()
    with pytest.raises(ValueError, match="bn_inference must be"):
        recipes.two_phase(model, base, x, y, bn_inference="sometimes", **KW)
    with pytest.raises(fl.SelectionError, match="matched no layer"):
        recipes.two_phase(model, base, x, y, freeze="nothing.like.this", **KW)
