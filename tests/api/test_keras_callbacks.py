"""Keras-named callbacks decide as Keras 3's do, on scripted metric sequences.

Keras's callbacks run through the same hook sequence as ``keras.Model.fit``
(``on_train_begin``, per epoch ``on_epoch_begin``/``on_epoch_end`` with the scripted
logs and a break on ``stop_training``, ``on_train_end``). frostline's run inside a
real ``fit``: a first callback writes the scripted value into the epoch's logs and
sets every weight to the epoch number, so which weights ``restore_best_weights`` put
back shows which epoch was restored. Decisions compared: the epoch training stopped
at, the best epoch, the restored weights, each epoch's learning rate, the
checkpoints written, the CSV text.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import frostline as fl  # noqa: E402

with contextlib.suppress(Exception):  # triton before TensorFlow (see tests/conftest.py)
    import torch._dynamo  # noqa: E402, F401

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.keras

X = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
Y = (X[:, :1] > 0).astype("float32")

LOSSES = [1.0, 0.8, 0.82, 0.79, 0.81, 0.85, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75]
ACCS = [0.5, 0.6, 0.6, 0.65, 0.64, 0.7, 0.69, 0.7, 0.71, 0.66, 0.65, 0.64]


@pytest.fixture(scope="module")
def kmodel():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=["accuracy"])
    model.fit(X, Y, epochs=1, verbose=0)  # builds the compiled metrics (their directions)
    return model


def keras_drive(model, callback, key, values):
    """Keras's fit loop around ``callback``, with ``key`` scripted; weights coded by epoch."""
    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin({})
    epochs_run, lrs = [], []
    for epoch, value in enumerate(values):
        callback.on_epoch_begin(epoch, {})
        model.set_weights([np.full(w.shape, epoch + 1, "float32") for w in model.get_weights()])
        logs = {"loss": 0.5, "accuracy": 0.5, "val_loss": 0.5, "val_accuracy": 0.5, key: value}
        callback.on_epoch_end(epoch, logs)
        epochs_run.append(epoch)
        lrs.append(float(np.asarray(model.optimizer.learning_rate)))
        if model.stop_training:
            break
    callback.on_train_end({})
    return epochs_run, lrs, float(model.get_weights()[0].flat[0])


class Script(fl.Callback):
    """Writes the scripted value into the logs and codes the weights with the epoch."""

    def __init__(self, key, values):
        self.key, self.values = key, values
        self.epochs, self.lrs = [], []

    def on_epoch_end(self, epoch, logs=None):
        with torch.no_grad():
            for p in self.model.module.parameters():
                p.fill_(epoch + 1)
        logs[self.key] = self.values[epoch]
        self.epochs.append(epoch)

    def on_train_end(self, logs=None):
        pass


class LrProbe(fl.Callback):
    def __init__(self):
        self.lrs = []

    def on_epoch_end(self, epoch, logs=None):
        self.lrs.append(self.model.learning_rate)


def fl_fit(callback, key, values, lr=0.1):
    torch.manual_seed(0)
    model = fl.wrap(nn.Linear(2, 1))
    model.compile(optimizer=fl.optimizers.SGD(lr), loss="mse", metrics=["accuracy"])
    script, probe = Script(key, values), LrProbe()
    model.fit(
        X,
        Y,
        epochs=len(values),
        batch_size=8,
        shuffle=False,
        verbose=0,
        validation_data=(X, Y),
        callbacks=[script, callback, probe],
    )
    return script.epochs, probe.lrs, float(model.module.weight.flatten()[0])


ES_CASES = [
    {"patience": 0},
    {"patience": 1},
    {"patience": 2},
    {"patience": 3, "min_delta": 0.05},
    {"patience": 2, "restore_best_weights": True},
    {"patience": 20, "restore_best_weights": True},  # never stops: restores anyway
    {"patience": 1, "start_from_epoch": 3, "restore_best_weights": True},
    {"patience": 2, "baseline": 0.75},
    {"patience": 3, "baseline": 0.9, "restore_best_weights": True},
]


@pytest.mark.parametrize("monitor", ["val_loss", "val_accuracy"])
@pytest.mark.parametrize("opts", ES_CASES, ids=[str(c) for c in ES_CASES])
def test_early_stopping_decides_as_keras(kmodel, monitor, opts, one_thread):
    values = LOSSES if monitor == "val_loss" else ACCS
    if monitor == "val_accuracy" and "baseline" in opts:
        opts = {**opts, "baseline": 1 - opts["baseline"] + 0.1}
    theirs = keras.callbacks.EarlyStopping(monitor=monitor, **opts)
    k_epochs, _, k_weight = keras_drive(kmodel, theirs, monitor, values)
    ours = fl.callbacks.EarlyStopping(monitor=monitor, **opts)
    f_epochs, _, f_weight = fl_fit(ours, monitor, values)
    assert f_epochs == k_epochs, "stopped at a different epoch"
    assert ours.stopped_epoch == theirs.stopped_epoch
    assert ours.best_epoch == theirs.best_epoch
    assert ours.best == pytest.approx(theirs.best)
    if opts.get("restore_best_weights"):
        assert f_weight == k_weight == theirs.best_epoch + 1, "restored another epoch's weights"


RLR_CASES = [
    {"patience": 1},
    {"patience": 2, "factor": 0.5, "cooldown": 1},
    {"patience": 1, "factor": 0.5, "min_lr": 0.02},
    {"patience": 0, "min_delta": 0.05},
]


@pytest.mark.parametrize("monitor", ["val_loss", "val_accuracy"])
@pytest.mark.parametrize("opts", RLR_CASES, ids=[str(c) for c in RLR_CASES])
def test_reduce_lr_on_plateau_decides_as_keras(kmodel, monitor, opts, one_thread):
    values = LOSSES if monitor == "val_loss" else ACCS
    kmodel.optimizer.learning_rate = 0.1
    theirs = keras.callbacks.ReduceLROnPlateau(monitor=monitor, **opts)
    _, k_lrs, _ = keras_drive(kmodel, theirs, monitor, values)
    ours = fl.callbacks.ReduceLROnPlateau(monitor=monitor, **opts)
    _, f_lrs, _ = fl_fit(ours, monitor, values)
    np.testing.assert_allclose(f_lrs, k_lrs, rtol=1e-6)
    assert len(set(f_lrs)) > 1, "the sequence should make it reduce at least once"


MC_CASES = [
    {"save_best_only": False},
    {"save_best_only": True},
    {"save_best_only": True, "initial_value_threshold": 0.75},
    {"save_best_only": True, "mode": "max"},
]


@pytest.mark.parametrize("opts", MC_CASES, ids=[str(c) for c in MC_CASES])
def test_model_checkpoint_saves_what_keras_saves(kmodel, opts, tmp_path, one_thread):
    theirs = keras.callbacks.ModelCheckpoint(str(tmp_path / "k-{epoch:02d}.keras"), **opts)
    saved: list[str] = []
    original = kmodel.save
    kmodel.save = lambda path, overwrite=True: saved.append(os.path.basename(path))
    try:
        keras_drive(kmodel, theirs, "val_loss", LOSSES)
    finally:
        kmodel.save = original
    ours = fl.callbacks.ModelCheckpoint(str(tmp_path / "f-{epoch:02d}.safetensors"), **opts)
    fl_fit(ours, "val_loss", LOSSES)
    assert [
        os.path.basename(p).replace("f-", "k-").replace(".safetensors", ".keras")
        for p in ours.saved
    ] == saved
    assert all(os.path.exists(p) for p in ours.saved)


def test_learning_rate_scheduler_sets_what_keras_sets(kmodel, one_thread):
    def schedule(epoch, lr):
        return lr if epoch < 2 else lr * 0.5

    kmodel.optimizer.learning_rate = 0.1
    _, k_lrs, _ = keras_drive(
        kmodel, keras.callbacks.LearningRateScheduler(schedule), "loss", LOSSES[:5]
    )
    _, f_lrs, _ = fl_fit(fl.callbacks.LearningRateScheduler(schedule), "loss", LOSSES[:5])
    np.testing.assert_allclose(f_lrs, k_lrs, rtol=1e-6)


@pytest.mark.parametrize("append", [False, True])
def test_csv_logger_writes_what_keras_writes(kmodel, tmp_path, append):
    rows = [{"loss": 1.0 / (e + 1), "accuracy": 0.5 + e / 10} for e in range(3)]
    texts = []
    for name, cls in (("k", keras.callbacks.CSVLogger), ("f", fl.callbacks.CSVLogger)):
        path = tmp_path / f"{name}.csv"
        if append:
            path.write_text("epoch,accuracy,loss,val_accuracy,val_loss\r\n9,1,2,NA,NA\r\n")
        cb = cls(str(path), append=append)
        cb.set_model(kmodel)
        cb.on_train_begin({})
        for epoch, logs in enumerate(rows):
            cb.on_epoch_end(epoch, dict(logs))
        cb.on_train_end({})
        texts.append(path.read_bytes())
    assert texts[1] == texts[0]


def test_terminate_on_nan_stops_where_keras_stops(kmodel):
    losses = [0.5, 0.4, math.nan, 0.3]
    decisions = []
    for cb, model in (
        (keras.callbacks.TerminateOnNaN(), kmodel),
        (fl.callbacks.TerminateOnNaN(), None),
    ):
        holder = model if model is not None else type("M", (), {"stop_training": False})()
        holder.stop_training = False
        cb.set_model(holder)
        stopped = None
        for batch, loss in enumerate(losses):
            cb.on_train_batch_end(batch, {"loss": loss})
            if holder.stop_training:
                stopped = batch
                break
        decisions.append(stopped)
    assert decisions[0] == decisions[1] == 2
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        fl.callbacks.TerminateOnNaN(raise_error=True).on_train_batch_end(0, {"loss": math.inf})


def test_missing_monitor_warns_like_keras_and_unknown_direction_is_an_error(kmodel):
    model = fl.wrap(nn.Linear(2, 1))
    model.compile(optimizer="sgd", loss="mse", metrics=["accuracy"])
    with pytest.warns(UserWarning, match="Early stopping conditioned on metric `val_loss`"):
        model.fit(X, Y, epochs=2, verbose=0, callbacks=[fl.callbacks.EarlyStopping()])
    with pytest.raises(ValueError, match="mode='max'"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[fl.callbacks.EarlyStopping("something")])
    with pytest.raises(ValueError):  # Keras refuses it too
        cb = keras.callbacks.EarlyStopping("something")
        cb.set_model(kmodel)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cb.on_epoch_end(0, {"something": 1.0})


@pytest.mark.parametrize("save_freq", [3, 5])
def test_model_checkpoint_every_n_batches_saves_what_keras_saves(
    kmodel, save_freq, tmp_path, one_thread
):
    """Keras's own fit (4 batches an epoch) against ours: the files written, by name."""
    theirs = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "k-{epoch}-{batch}.weights.h5"), save_freq=save_freq, save_weights_only=True
    )
    saved: list[str] = []
    original = kmodel.save_weights
    kmodel.save_weights = lambda filepath, overwrite=True: saved.append(os.path.basename(filepath))
    try:
        kmodel.fit(X, Y, batch_size=2, epochs=3, verbose=0, callbacks=[theirs])
    finally:
        kmodel.save_weights = original
    model = fl.wrap(nn.Linear(2, 1))
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="mse")
    ours = fl.callbacks.ModelCheckpoint(
        str(tmp_path / "f-{epoch}-{batch}.weights.safetensors"),
        save_freq=save_freq,
        save_weights_only=True,
    )
    model.fit(X, Y, batch_size=2, epochs=3, verbose=0, callbacks=[ours])
    assert [
        os.path.basename(p).replace("f-", "k-").replace(".safetensors", ".h5") for p in ours.saved
    ] == saved
    assert all(os.path.exists(p) for p in ours.saved)


class _Epochs(keras.callbacks.Callback):
    def __init__(self, crash_at=None):
        super().__init__()
        self.crash_at, self.epochs = crash_at, []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.crash_at == (self.epochs[-1], batch):
            raise KeyboardInterrupt


class _FlEpochs(fl.Callback):
    writes_weights = False

    def __init__(self, crash_at=None):
        self.crash_at, self.epochs = crash_at, []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.crash_at == (self.epochs[-1], batch):
            raise KeyboardInterrupt


@pytest.mark.parametrize("save_freq", ["epoch", 3])
@pytest.mark.parametrize("delete", [True, False])
def test_backup_and_restore_decides_as_keras(save_freq, delete, tmp_path, one_thread):
    """After an interruption in epoch 2 (batch 1), a new fit goes on from the epoch Keras
    goes on from, and the backup is deleted (or kept) as Keras's is."""
    kmodel = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])  # fresh: Keras
    kmodel.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")  # keeps _initial_epoch
    runs = {}
    for who in ("keras", "frostline"):
        backup = tmp_path / who
        if who == "keras":

            def make(backup=backup):
                return keras.callbacks.BackupAndRestore(
                    str(backup), save_freq=save_freq, delete_checkpoint=delete
                )

            first, second = _Epochs((2, 1)), _Epochs()
            with pytest.raises(KeyboardInterrupt):
                kmodel.fit(X, Y, batch_size=2, epochs=5, verbose=0, callbacks=[make(), first])
            kmodel.fit(X, Y, batch_size=2, epochs=5, verbose=0, callbacks=[make(), second])
        else:
            model = fl.wrap(nn.Linear(2, 1))
            model.compile(optimizer=fl.optimizers.SGD(0.1), loss="mse")

            def make(backup=backup):
                return fl.callbacks.BackupAndRestore(
                    backup, save_freq=save_freq, delete_checkpoint=delete
                )

            first, second = _FlEpochs((2, 1)), _FlEpochs()
            with pytest.raises(KeyboardInterrupt):
                model.fit(X, Y, batch_size=2, epochs=5, verbose=0, callbacks=[make(), first])
            model.fit(X, Y, batch_size=2, epochs=5, verbose=0, callbacks=[make(), second])
        runs[who] = (first.epochs, second.epochs, backup.exists())
    assert runs["frostline"] == runs["keras"]
    assert runs["keras"][1][0] == 2
