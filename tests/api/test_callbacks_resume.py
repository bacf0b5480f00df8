"""Exact resume with every built-in stateful callback and with learning-rate schedules.

A run stopped after epoch 2 (its checkpoint written by ``fit(checkpoint_dir=...)``)
and resumed to the end must give, bitwise on CPU, the weights, the history and the
callback decisions of the run that was never stopped. The monitored value is
scripted so that each callback's decisive moment falls after the resume point while
depending on what it saw before it (EarlyStopping's best weights from epoch 1 are
restored at the end of the resumed run: they must come from the checkpoint).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl

VAL_LOSS = [1.0, 0.5, 0.9, 0.95, 0.97, 0.99]
EPOCHS, CRASH_AFTER = len(VAL_LOSS), 3
DATA = (
    np.random.default_rng(0).random((64, 8), dtype=np.float32),
    np.random.default_rng(1).integers(0, 3, 64),
)


class Script(fl.Callback):
    """Sets the monitored value per epoch (stateless: it depends on the epoch only)."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = VAL_LOSS[epoch]
        logs["epoch_time"] = 0.0  # wall clock: not part of what must repeat


class Rates(fl.Callback):
    """Records the rate of every epoch (its state is the record, restored on resume)."""

    def __init__(self):
        self.rates = []

    def on_epoch_end(self, epoch, logs=None):
        self.rates.append(self.model.learning_rate)

    def get_state(self):
        return {"rates": self.rates}

    def set_state(self, state):
        self.rates = list(state["rates"])


def optimizer(kind: str):
    schedules = fl.optimizers.schedules
    if kind == "exponential":
        return fl.optimizers.Adam(schedules.ExponentialDecay(1e-2, 3, 0.5))
    if kind == "cosine-warmup":
        return fl.optimizers.SGD(
            schedules.CosineDecay(0.0, 12, warmup_target=0.1, warmup_steps=5), momentum=0.9
        )
    if kind == "piecewise":
        return fl.optimizers.Nadam(schedules.PiecewiseConstantDecay([6, 12], [1e-2, 5e-3, 1e-3]))
    return fl.optimizers.AdamW(1e-2, weight_decay=0.05)


def callbacks(kind: str, directory) -> list[fl.Callback]:
    cbs = fl.callbacks
    if kind == "early_stopping":
        return [cbs.EarlyStopping(patience=2, restore_best_weights=True)]
    if kind == "reduce_lr_on_plateau":
        return [cbs.ReduceLROnPlateau(patience=1, factor=0.5, cooldown=1)]
    if kind == "model_checkpoint":
        return [
            cbs.ModelCheckpoint(
                str(directory / "best-{epoch:02d}.safetensors"),
                save_best_only=True,
                initial_value_threshold=0.92,
            )
        ]
    if kind == "csv_logger":
        return [cbs.CSVLogger(str(directory / "log.csv"))]
    if kind == "learning_rate_scheduler":
        return [cbs.LearningRateScheduler(lambda epoch, lr: lr * (0.5 if epoch == 4 else 1.0))]
    return []


CASES = [
    ("early_stopping", "adamw"),
    ("reduce_lr_on_plateau", "adamw"),
    ("model_checkpoint", "adamw"),
    ("csv_logger", "adamw"),
    ("learning_rate_scheduler", "adamw"),
    ("history", "exponential"),
    ("history", "cosine-warmup"),
    ("reduce_lr_on_plateau", "piecewise"),
]


def run(kind, opt, directory, epochs, **kw):
    torch.manual_seed(0)
    model = fl.Sequential(
        [nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)]
    )
    model.compile(optimizer(opt), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    cbs = [Script(), *callbacks(kind, directory), Rates()]
    history = model.fit(*DATA, epochs=epochs, batch_size=16, verbose=0, seed=3, callbacks=cbs, **kw)
    return model, history, cbs


@pytest.mark.parametrize("kind, opt", CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_resume_with_callback_is_bitwise_identical(tmp_path, kind, opt, one_thread):
    full_dir, run_dir = tmp_path / "full", tmp_path / "run"
    full_dir.mkdir(), run_dir.mkdir()
    full, full_hist, full_cbs = run(kind, opt, full_dir, EPOCHS)
    run(kind, opt, run_dir, CRASH_AFTER, checkpoint_dir=run_dir / "ckpt")  # "crashes" here
    resumed, hist, cbs = run(kind, opt, run_dir, EPOCHS, resume=run_dir / "ckpt")

    for (k, a), (_, b) in zip(
        full.module.state_dict().items(), resumed.module.state_dict().items()
    ):
        assert torch.equal(a, b), k

    def without_time(h):
        return {k: v for k, v in h.history.items() if k != "epoch_time"}

    assert without_time(hist) == without_time(full_hist)
    assert cbs[-1].rates == full_cbs[-1].rates
    assert resumed.optimizer.iterations == full.optimizer.iterations
    ours, theirs = cbs[1] if len(cbs) > 2 else None, full_cbs[1] if len(full_cbs) > 2 else None
    if kind == "early_stopping":
        assert theirs.stopped_epoch == ours.stopped_epoch == 3
        assert theirs.best_epoch == ours.best_epoch == 1
    if kind == "reduce_lr_on_plateau":
        assert len(set(cbs[-1].rates)) > 1, "the rate did change"
    if kind == "model_checkpoint":
        names = [p.rsplit("/", 1)[-1] for p in ours.saved]
        assert names == [p.rsplit("/", 1)[-1] for p in theirs.saved] == ["best-02.safetensors"]
    if kind == "csv_logger":
        rows = [
            list(csv.reader((d / "log.csv").read_text().splitlines())) for d in (full_dir, run_dir)
        ]
        assert rows[0] == rows[1] and len(rows[0]) == EPOCHS + 1


def test_best_weights_travel_in_the_checkpoint_as_safetensors(tmp_path, one_thread):
    run("early_stopping", "adamw", tmp_path, CRASH_AFTER, checkpoint_dir=tmp_path / "ckpt")
    newest = sorted((tmp_path / "ckpt").glob("epoch-*"))[-1]
    from safetensors.torch import load_file

    saved = load_file(newest / "callbacks.safetensors")
    assert saved and all(k.startswith("2/") for k in saved)  # after History and Script
    assert not list(newest.glob("*.pt")) and not list(newest.glob("*.pkl"))
