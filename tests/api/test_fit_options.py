"""Keras's fit/evaluate options beyond the parity runs: errors for bad input, how data
items unpack, loaders with steps_per_epoch, and exact resume with steps_per_epoch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import frostline as fl
from frostline.engine.data import DataError


def model(outputs: int = 1):
    torch.manual_seed(0)
    m = fl.wrap(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    if outputs == 1:
        m.compile(fl.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return m


X = np.random.default_rng(0).normal(size=(10, 3)).astype("float32")
Y = np.array([0, 1] * 5)
SW = np.linspace(0.1, 2.0, 10).astype("float32")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_weight": {0: 1.0}, "sample_weight": SW}, "cannot both be given"),
        ({"class_weight": [1.0, 2.0]}, "class_weight must be a non-empty dict"),
        ({"class_weight": {"a": 1.0}}, "class_weight keys must be class indices"),
        ({"class_weight": {0: "x"}}, r"class_weight\[0\] must be a number"),
        ({"sample_weight": SW[:4]}, "x has 10 samples but sample_weight has 4"),
        ({"validation_freq": 0}, "validation_freq"),
        ({"validation_freq": [0, 2]}, "each epoch in validation_freq"),
        ({"validation_freq": "2"}, "validation_freq"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be an int >= 1"),
        ({"validation_steps": 1.5}, "validation_steps must be an int >= 1"),
        ({"validation_batch_size": -1}, "batch_size must be a positive int"),
    ],
)
def test_bad_options_say_what_was_given(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        model().fit(X, Y, verbose=0, **kwargs)


def test_sample_weight_with_a_dataset_is_refused():
    ds = TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
    with pytest.raises(DataError, match="is a Dataset, so sample_weight must be None"):
        model().fit(ds, sample_weight=SW, verbose=0)


def test_class_weight_needs_a_single_output():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    m = fl.wrap(Two())
    m.compile(
        "sgd", loss={"a": "sparse_categorical_crossentropy", "b": "sparse_categorical_crossentropy"}
    )
    with pytest.raises(DataError, match="only supported for models with a single output"):
        m.fit(X, {"a": Y, "b": Y}, class_weight={0: 2.0}, verbose=0)
    # several targets by position and one weight per sample for both: a 4-element item
    ds = TensorDataset(*(torch.from_numpy(a) for a in (X, Y, Y, SW)))
    h = m.fit(ds, epochs=1, verbose=0)
    assert set(h.history) >= {"a_loss", "b_loss"}
    ds3 = TensorDataset(*(torch.from_numpy(a) for a in (X, Y, Y)))  # (x, ya, yb): no weights
    assert m.fit(ds3, verbose=0).history["loss"]


def test_a_dataset_with_weights_and_class_weight_is_refused():
    ds = TensorDataset(*(torch.from_numpy(a) for a in (X, Y, SW)))
    with pytest.raises(DataError, match="cannot both be given"):
        model().fit(ds, class_weight={0: 2.0}, verbose=0)


def test_weighted_metrics_and_loss_names():
    m = model()
    m.compile(
        fl.optimizers.SGD(0.1),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        weighted_metrics=["accuracy", "accuracy"],
    )
    h = m.fit(X, Y, sample_weight=SW, epochs=1, verbose=0)
    assert list(h.history) == [
        "loss",
        "accuracy",
        "weighted_accuracy",
        "weighted_accuracy_1",
        "epoch_time",
    ]
    # a weighted metric with all weights 1 equals the unweighted one; with others it differs
    logs = m.evaluate(X, Y, sample_weight=np.ones(10, "float32"), return_dict=True, verbose=0)
    assert logs["weighted_accuracy"] == logs["accuracy"]
    w = np.where(Y == 1, 1.0, 0.0).astype("float32")
    logs = m.evaluate(X, Y, sample_weight=w, return_dict=True, verbose=0)
    preds = m.predict(X).argmax(1)
    assert logs["weighted_accuracy"] == pytest.approx(float((preds == Y)[Y == 1].mean()))
    torchmetrics = pytest.importorskip("torchmetrics")
    with pytest.raises(TypeError, match="takes no sample weights"):
        m.compile(
            "sgd", "sparse_categorical_crossentropy", weighted_metrics=[torchmetrics.MeanMetric()]
        )


def test_a_callable_loss_needs_per_sample_values_to_weigh():
    m = model()
    m.compile("sgd", loss=lambda p, t: nn.functional.cross_entropy(p, t))
    with pytest.raises(ValueError, match="cannot weigh samples"):
        m.fit(X, Y, sample_weight=SW, verbose=0)
    m.compile("sgd", loss=lambda p, t: nn.functional.cross_entropy(p, t, reduction="none"))
    h = m.fit(X, Y, sample_weight=SW, verbose=0)
    assert np.isfinite(h.history["loss"][0])


def test_loader_with_steps_per_epoch_goes_on_where_it_stopped():
    steps: list[int] = []

    class Probe(fl.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            steps.append(self.params["steps"])

    y = np.arange(10, dtype="float32")  # the sample number
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=2)
    firsts: list[float] = []

    def loss(pred, true):  # called once per train step, with the batch's targets
        firsts.append(float(true[0]))
        return ((pred.squeeze(-1) - true) ** 2).mean()

    m = fl.wrap(nn.Linear(3, 1))
    m.compile(fl.optimizers.SGD(0.01), loss=loss)
    with pytest.warns(UserWarning, match="ran out after 2 of steps_per_epoch=3"):
        m.fit(loader, epochs=3, steps_per_epoch=3, callbacks=[Probe()], verbose=0)
    # 5 batches a pass: epochs of 3 and 2 (the data ends there, as in Keras), then a new pass
    assert firsts == [0, 2, 4, 6, 8, 0, 2, 4]
    assert steps == [3, 3, 3]


def test_resume_with_steps_per_epoch_is_exact(tmp_path):
    def run(epochs, resume=None):
        m = model()
        m.fit(
            X,
            Y,
            batch_size=3,
            epochs=epochs,
            steps_per_epoch=3,
            seed=1,
            checkpoint_dir=tmp_path,
            resume=resume,
            verbose=0,
        )
        return [p.detach().clone() for p in m.module.parameters()]

    whole = run(5)
    shutil.rmtree(tmp_path)
    run(2)
    resumed = run(5, resume=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))
