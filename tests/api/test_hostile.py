"""Hostile inputs: every bad input gets a clear error and leaves nothing half-written (issue 7)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import frostline as fl
from frostline.io.errors import CheckpointError

X = np.random.default_rng(0).random((32, 4), dtype=np.float32)
Y = np.arange(32) % 3


def model():
    torch.manual_seed(0)
    m = fl.Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)])
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "m.safetensors"
    model().save(path)
    return path


# -- corrupted files ------------------------------------------------------------------
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.floats(0.0, 0.999))
def test_truncated_model_file(saved, tmp_path_factory, cut):
    data = saved.read_bytes()
    bad = tmp_path_factory.mktemp("t") / "bad.safetensors"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError) as e:
        fl.load(bad)
    assert str(bad) in str(e.value)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pos=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_corrupted_model_file_never_loads_wrong_data(saved, tmp_path_factory, pos, flip):
    data = bytearray(saved.read_bytes())
    pos %= len(data)
    data[pos] ^= flip
    bad = tmp_path_factory.mktemp("c") / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises((CheckpointError, ValueError)):
        fl.load(bad)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_text("hello, I am not a model")
    with pytest.raises(CheckpointError, match="x.safetensors"):
        fl.load(p)
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        fl.load(tmp_path / "nope.safetensors")


def test_metadata_naming_missing_import_path(tmp_path):
    import json

    from frostline.io.safetensors_io import save_safetensors

    meta = {
        "format": "frostline.model",
        "version": 1,
        "name": "m",
        "class": "Model",
        "architecture": {"kind": "import", "target": "torch.does_not_exist:factory"},
        "trainable": {},
    }
    save_safetensors(
        {"w": torch.zeros(1)}, tmp_path / "m.safetensors", {"frostline_model": json.dumps(meta)}
    )
    with pytest.raises(CheckpointError, match="torch.does_not_exist"):
        fl.load(tmp_path / "m.safetensors")
    meta["architecture"] = {"kind": "import", "target": "os:system", "args": ["echo pwned"]}
    save_safetensors(
        {"w": torch.zeros(1)}, tmp_path / "m2.safetensors", {"frostline_model": json.dumps(meta)}
    )
    with pytest.raises(fl.UnsafeFileError, match="'os:system'.*standard library"):
        fl.load(tmp_path / "m2.safetensors")


def test_truncated_checkpoint_is_skipped_for_an_older_one(tmp_path):
    m = model()
    m.fit(X, Y, epochs=3, verbose=0, checkpoint_dir=tmp_path)
    newest = tmp_path / "epoch-00002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])
    m2 = model()
    with pytest.warns(UserWarning, match="epoch-00002"):
        h = m2.fit(X, Y, epochs=4, verbose=0, resume=tmp_path)
    assert h.epoch == [0, 1, 2, 3]  # resumed after epoch 1: epochs 2 and 3 ran again


# -- wrong types to public functions ---------------------------------------------------
@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda m: setattr(m, "trainable", "no"), TypeError, "bool"),
        (lambda m: setattr(m, "trainable", 1), TypeError, "bool"),
        (lambda m: m.get_layer(), ValueError, "exactly one"),
        (lambda m: m.get_layer("linear", index=0), ValueError, "exactly one"),
        (lambda m: m.get_layer(3.5), TypeError, "str"),
        (lambda m: m.layers[7], IndexError, "-3..2"),
        (lambda m: m.layers["0"], KeyError, "linear"),
        (lambda m: m.freeze(42), TypeError, "selector"),
        (lambda m: m.freeze(fl.select.first(-1)), ValueError, "non-negative"),
        (lambda m: m.freeze(fl.select.regex("(")), ValueError, "regular expression"),
        (lambda m: m.freeze("nothing*"), fl.SelectionError, "nothing"),
        (lambda m: m.compile(optimizer="adamm", loss="mse"), ValueError, "adam"),
        (lambda m: m.compile(optimizer=3, loss="mse"), TypeError, "optimizer"),
        (lambda m: m.compile(loss="crossentropy"), ValueError, "sparse_categorical_crossentropy"),
        (lambda m: m.compile(loss="mse", metrics=["acuracy"]), ValueError, "accuracy"),
        (lambda m: m.compile(loss="mse", device="tpu"), ValueError, "device"),
        (lambda m: m.compile(loss="mse", precision="int8"), ValueError, "precision"),
        (lambda m: m.fit(X, Y, batch_size=0, verbose=0), fl.DataError, "batch_size"),
        (lambda m: m.fit(X, Y, batch_size=-4, verbose=0), fl.DataError, "batch_size"),
        (lambda m: m.fit(X, Y, epochs=-1, verbose=0), ValueError, "epochs"),
        (lambda m: m.fit(X, Y, epochs=1, verbose=7), ValueError, "verbose"),
        (lambda m: m.fit(X, Y[:10], verbose=0), fl.DataError, "32 samples but y has 10"),
        (lambda m: m.fit(X[:0], Y[:0], verbose=0), fl.DataError, "empty"),
        (lambda m: m.fit("data.csv", Y, verbose=0), fl.DataError, "NumPy array"),
        (lambda m: m.fit(X, Y, validation_split=1.5, verbose=0), fl.DataError, "validation_split"),
        (lambda m: m.fit(X, Y + 5, verbose=0), ValueError, "labels must be in [0, 2]"),
        (lambda m: m.fit(X, -Y - 1, verbose=0), ValueError, "labels must be in [0, 2]"),
        (lambda m: m.fit(np.where(X > 0.5, np.nan, X), Y, verbose=0), fl.DataError, "NaN"),
        (lambda m: m.fit(np.where(X > 0.5, np.inf, X), Y, verbose=0), fl.DataError, "inf"),
        (
            lambda m: m.fit(X[:, :3], Y, verbose=0),
            fl.DataError,
            "first layer 'linear' (Linear) expects",
        ),
        (lambda m: m.save("model.pt"), ValueError, ".safetensors"),
        (lambda m: m.unfreeze(fl.select.last(1), learning_rate=-1), ValueError, "learning_rate"),
    ],
)
def test_bad_input_errors_are_clear(call, exc, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = model()
    with pytest.raises(exc) as e:
        call(m)
    assert words in str(e.value)
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_nothing_trainable():
    m = model()
    m.trainable = False
    with pytest.raises(fl.TrainingError, match="nothing to train"):
        m.fit(X, Y, verbose=0)


def test_nan_loss_names_epoch_and_batch():
    m = model()

    class Poison(fl.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if self.model.history.epoch == [0] and batch == 1:
                with torch.no_grad():
                    self.model.module[2].bias.fill_(float("nan"))

    with pytest.raises(fl.TrainingError, match="epoch 2, batch 2"):
        m.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[Poison()])
    m2 = model()
    h = m2.fit(
        X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[Poison(), fl.callbacks.TerminateOnNaN()]
    )
    assert h.epoch == [0, 1]  # the poisoned epoch ends at the NaN batch, and training stops there


@settings(max_examples=25, deadline=None)
@given(name=st.text(min_size=1, max_size=12).filter(lambda s: s.strip() != ""))
def test_odd_layer_names_work_or_fail_clearly(name):
    class Holder(nn.Module):
        pass

    h = Holder()
    try:
        h.add_module(name, nn.Linear(2, 2))
    except (KeyError, TypeError):
        return  # torch itself refuses (dots, empty): nothing for frostline to do
    m = fl.wrap(h)
    assert m.get_layer(name).class_name == "Linear"
    assert m.layers[0].name == name
    plan = m.freeze(
        fl.select.name(name.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]"))
    )
    assert plan.paths == [name]
    assert m.summary_text().count("Linear") == 1


def test_unicode_and_space_names_in_sequential_and_files(tmp_path):
    base = fl.wrap(nn.Sequential(nn.Linear(2, 2)), name="bäse model.v2")
    m = fl.Sequential([base, nn.Linear(2, 1)], name="ünï code")
    assert m.layers[0] is base and "bäse_model_v2" in dict(m.module.named_children())
    m.save(tmp_path / "ü.safetensors")
    assert fl.load(tmp_path / "ü.safetensors").count_params() == m.count_params()
