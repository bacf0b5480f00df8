"""Checkpoints during fit and exact resume (issue 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.io.errors import CheckpointError


def make_model() -> fl.Sequential:
    torch.manual_seed(0)
    m = fl.Sequential(
        [
            nn.Linear(8, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        ]
    )
    m.trainable = False
    m.layers[-1].trainable = True
    m.compile(
        fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return m


class PhaseChange(fl.Callback):
    """Unfreeze the middle Linear with its own rate at epoch 2 (a recipe's phase change)."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            self.model.unfreeze(fl.select.name("linear_1"), learning_rate=1e-3)


class Gradual(fl.Callback):
    """One more layer from the top each epoch, with state that must survive a resume."""

    def __init__(self):
        self.unfrozen = 0

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= 1:
            self.unfrozen += 1
            self.model.unfreeze(fl.select.last(self.unfrozen))

    def get_state(self):
        return {"unfrozen": self.unfrozen}

    def set_state(self, state):
        self.unfrozen = state["unfrozen"]


DATA = (
    np.random.default_rng(0).random((96, 8), dtype=np.float32),
    np.random.default_rng(1).integers(0, 3, 96),
)


def run(epochs, callbacks, **kw):
    m = make_model()
    h = m.fit(
        *DATA,
        epochs=epochs,
        batch_size=16,
        verbose=0,
        seed=3,
        callbacks=callbacks(),
        validation_split=0.25,
        **kw,
    )
    return m, h


@pytest.mark.parametrize(
    "callbacks", [lambda: [PhaseChange()], lambda: [Gradual()]], ids=["phase-change", "gradual"]
)
def test_resume_is_bitwise_identical(tmp_path, callbacks):
    full, full_hist = run(5, callbacks)
    run(2, callbacks, checkpoint_dir=tmp_path)  # "crashes" after epoch index 1
    resumed, hist = run(5, callbacks, resume=tmp_path)
    for (k, a), (_, b) in zip(
        full.module.state_dict().items(), resumed.module.state_dict().items()
    ):
        assert torch.equal(a, b), k
    assert [p.requires_grad for p in resumed.module.parameters()] == [
        p.requires_grad for p in full.module.parameters()
    ]
    assert hist.history["loss"] == full_hist.history["loss"]
    assert len(hist.history["val_loss"]) == 5


def test_resume_does_not_come_back_refrozen(tmp_path):
    run(3, lambda: [PhaseChange()], checkpoint_dir=tmp_path)  # linear_1 unfrozen at epoch 2
    m = make_model()  # the user's script freezes the base again before resuming
    assert not m.get_layer("linear_1").module.weight.requires_grad
    m.fit(*DATA, epochs=3, verbose=0, resume=tmp_path)
    assert m.get_layer("linear_1").module.weight.requires_grad
    groups = m.optimizer.param_groups
    assert any(g["lr"] == pytest.approx(1e-3) for g in groups)


def test_keeps_last_n_and_best(tmp_path):
    run(6, lambda: [], checkpoint_dir=tmp_path, keep_checkpoints=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("epoch-"))
    assert "epoch-00005" in names and "epoch-00004" in names and len(names) <= 3


def test_resume_from_nothing_is_a_clear_error(tmp_path):
    m = make_model()
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        m.fit(*DATA, epochs=2, verbose=0, resume=tmp_path)


def test_resume_into_other_architecture_lists_keys(tmp_path):
    run(1, lambda: [], checkpoint_dir=tmp_path)
    other = fl.Sequential([nn.Linear(8, 4), nn.Linear(4, 3)])
    other.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(CheckpointError, match="Missing keys"):
        other.fit(*DATA, epochs=2, verbose=0, resume=tmp_path)


@pytest.mark.parametrize("stop_after", [1, 3], ids=["in-phase-1", "in-phase-2"])
def test_two_phase_recipe_resumes_in_the_right_phase(tmp_path, stop_after):
    def build():
        torch.manual_seed(0)
        base = fl.wrap(
            nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()), name="base"
        )
        return fl.Sequential([base, nn.Linear(16, 3)]), base

    class Crash(fl.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == stop_after:
                raise KeyboardInterrupt

    kw = dict(
        unfreeze=1,
        phase1_epochs=3,
        phase2_epochs=3,
        loss="sparse_categorical_crossentropy",
        verbose=0,
        seed=5,
    )
    full_model, full_base = build()
    full = fl.recipes.two_phase(full_model, full_base, *DATA, **kw)
    m, b = build()
    with pytest.raises(KeyboardInterrupt):
        fl.recipes.two_phase(m, b, *DATA, callbacks=[Crash()], checkpoint_dir=tmp_path, **kw)
    m, b = build()
    again = fl.recipes.two_phase(m, b, *DATA, resume=tmp_path, **kw)
    assert again.history["phase"] == [1, 1, 1, 2, 2, 2]
    assert again.history["loss"] == full.history["loss"]
    for (k, a), (_, c) in zip(
        full_model.module.state_dict().items(), m.module.state_dict().items()
    ):
        assert torch.equal(a, c), k
