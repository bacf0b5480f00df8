"""BackupAndRestore and ModelCheckpoint(save_freq=N, save_weights_only=) on fit's exact
checkpoints: an interrupted run, started again, ends bitwise where the uninterrupted run
ends (weights, History), whether it stopped between epochs or mid-epoch; Keras's
decisions (which epochs run again, which files are written, when the backup goes) are
checked against real Keras 3 in tests/api/test_keras_callbacks.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = np.arange(32) % 3


class Crash(Exception):
    pass


class Interrupt(fl.callbacks.Callback):
    """Raises when training reaches (epoch, batch) — batch None: that epoch's end."""

    writes_weights = False

    def __init__(self, epoch: int, batch: int | None):
        self.at, self.epoch = (epoch, batch), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.at == (self.epoch, batch):
            raise Crash

    def on_epoch_end(self, epoch, logs=None):
        if self.at == (epoch, None):
            raise Crash


def run(backup_dir, save_freq, interrupt=None, epochs=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    model = fl.wrap(net)
    model.layers[0].trainable = False
    model.compile(fl.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    cbs = [
        fl.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.9),  # compounds: applied once
        fl.callbacks.BackupAndRestore(backup_dir, save_freq=save_freq),
        *([interrupt] if interrupt is not None else []),
    ]
    h = model.fit(X, Y, batch_size=8, epochs=epochs, seed=3, verbose=0, callbacks=cbs)
    return [p.detach().clone() for p in net.parameters()], h.history


@pytest.mark.parametrize(
    "save_freq, at",
    [("epoch", (2, None)), ("epoch", (2, 1)), (3, (2, 1)), (2, (1, 3))],
    ids=["epoch-at-epoch-end", "epoch-mid-epoch", "every-3-batches", "every-2-batches"],
)
def test_interrupted_run_ends_where_the_uninterrupted_one_ends(tmp_path, save_freq, at):
    whole, whole_history = run(tmp_path / "a", save_freq)
    assert not (tmp_path / "a").exists(), "delete_checkpoint: the backup goes at the end"
    backup = tmp_path / "b"
    with pytest.raises(Crash):
        run(backup, save_freq, Interrupt(*at))
    assert backup.exists(), "an interrupted run keeps its backup"
    resumed, history = run(backup, save_freq)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))
    for key in whole_history:
        if key != "epoch_time":
            assert history[key] == whole_history[key], key
    assert not backup.exists()


def test_backup_and_restore_arguments(tmp_path):
    with pytest.raises(ValueError, match="needs a backup_dir"):
        fl.callbacks.BackupAndRestore("")
    with pytest.raises(ValueError, match="save_freq must be 'epoch' or an int"):
        fl.callbacks.BackupAndRestore(tmp_path, save_freq="batch")
    with pytest.raises(ValueError, match="save_freq must be an int >= 1"):
        fl.callbacks.BackupAndRestore(tmp_path, save_freq=0)
    with pytest.raises(TypeError, match="delete_checkpoint must be a bool"):
        fl.callbacks.BackupAndRestore(tmp_path, delete_checkpoint="yes")
    m = fl.wrap(nn.Linear(4, 3))
    m.compile("sgd", "sparse_categorical_crossentropy")
    two = [
        fl.callbacks.BackupAndRestore(tmp_path / "1"),
        fl.callbacks.BackupAndRestore(tmp_path / "2"),
    ]
    with pytest.raises(ValueError, match="2 backup callbacks"):
        m.fit(X, Y, verbose=0, callbacks=two)
    keep = fl.callbacks.BackupAndRestore(
        tmp_path / "k", delete_checkpoint=False, double_checkpoint=True
    )
    m.fit(X, Y, epochs=3, verbose=0, callbacks=[keep])
    assert sorted(p.name for p in (tmp_path / "k").iterdir() if p.is_dir()) == [
        "epoch-00001",
        "epoch-00002",
    ]


def test_model_checkpoint_every_n_batches_and_weights_only(tmp_path):
    m = fl.wrap(nn.Sequential(nn.Linear(4, 3)))
    m.compile("sgd", "sparse_categorical_crossentropy")
    every = fl.callbacks.ModelCheckpoint(
        str(tmp_path / "m-{epoch}-{batch}.weights.safetensors"), save_freq=3, save_weights_only=True
    )
    last = fl.callbacks.ModelCheckpoint(
        str(tmp_path / "last.weights.safetensors"), save_freq=8, save_weights_only=True
    )
    m.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=[every, last])  # 4 batches an epoch
    names = [p.split("/")[-1] for p in every.saved]
    assert names == ["m-1-3.weights.safetensors", "m-2-2.weights.safetensors"]
    assert last.saved == [str(tmp_path / "last.weights.safetensors")]  # the 8th batch: the end
    other = fl.wrap(nn.Sequential(nn.Linear(4, 3)))
    other.load_weights(last.saved[-1])
    assert torch.equal(other.module[0].weight, m.module[0].weight)
    with pytest.raises(ValueError, match=r"must end in \.weights\.safetensors"):
        fl.callbacks.ModelCheckpoint(str(tmp_path / "m.safetensors"), save_weights_only=True)
    with pytest.raises(ValueError, match="save_freq must be 'epoch' or an int"):
        fl.callbacks.ModelCheckpoint(str(tmp_path / "m.safetensors"), save_freq="batch")
