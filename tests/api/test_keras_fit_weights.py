"""fit/evaluate as Keras 3 has them, against real Keras (TensorFlow backend).

Same model (Dense -> BatchNormalization -> ReLU -> Dense), same weights and data in
torch and Keras; several epochs with a partial last batch, frozen layers (a frozen
BatchNorm runs in inference mode in both) and a trainable BatchNorm. Compared: the
weights after training (within 1e-6) and every History entry (1e-4 relative), for
``class_weight``, ``sample_weight`` (arrays, and a third element of Dataset items),
``weighted_metrics``, validation with sample weights, ``validation_freq`` (int and list),
``steps_per_epoch`` (an epoch that stops at the end of the data, as Keras's does),
``validation_steps`` and ``validation_batch_size``; and ``evaluate(sample_weight=,
steps=)``. The frozen-part cache gives the same numbers as ``cache=False``.
"""

from __future__ import annotations

import contextlib
import os
import warnings

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import frostline as fl  # noqa: E402
from frostline.engine.runner import CacheState  # noqa: E402

with contextlib.suppress(Exception):  # triton before TensorFlow (see tests/conftest.py)
    import torch._dynamo  # noqa: E402, F401

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.keras
L = keras.layers

N, BATCH, CLASSES = 28, 8, 3  # 4 batches a pass, the last one of 4 samples


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 4)).astype("float32")
    y = rng.integers(0, CLASSES, N)
    sw = rng.uniform(0.2, 3.0, N).astype("float32")
    return x, y, sw


def build(frozen: str):
    """The torch net, its frostline model and the Keras twin with the same weights."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6, eps=1e-3, momentum=0.01)  # Keras's epsilon and momentum (0.99)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    net = nn.Sequential(nn.Linear(4, 6), bn, nn.ReLU(), nn.Linear(6, CLASSES))
    model = fl.wrap(net)
    k = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(6),
            L.BatchNormalization(epsilon=1e-3, momentum=0.99),
            L.ReLU(),
            L.Dense(CLASSES),
        ]
    )
    k.layers[0].set_weights([net[0].weight.detach().numpy().T, net[0].bias.detach().numpy()])
    k.layers[1].set_weights(
        [t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    )
    k.layers[3].set_weights([net[3].weight.detach().numpy().T, net[3].bias.detach().numpy()])
    frozen_layers = {"dense_bn": (0, 1), "bn": (1,), "none": ()}[frozen]
    for i in frozen_layers:
        model.layers[i].trainable = False
        k.layers[i].trainable = False
    return net, model, k


def compile_both(model, k, optimizer: str, weighted: bool = True):
    metrics = ["accuracy"]
    weighted_metrics = ["accuracy"] if weighted else None
    if optimizer == "adam":
        kopt, fopt = keras.optimizers.Adam(0.01), fl.optimizers.Adam(0.01)
    else:
        kopt, fopt = keras.optimizers.SGD(0.1, momentum=0.9), fl.optimizers.SGD(0.1, momentum=0.9)
    k.compile(
        optimizer=kopt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
        weighted_metrics=weighted_metrics,
    )
    model.compile(
        optimizer=fopt,
        loss="sparse_categorical_crossentropy",
        metrics=metrics,
        weighted_metrics=weighted_metrics,
    )


def assert_weights_equal(net, k, trainable_bn: bool):
    np.testing.assert_allclose(
        net[0].weight.detach().numpy().T, k.layers[0].get_weights()[0], atol=1e-6
    )
    np.testing.assert_allclose(
        net[0].bias.detach().numpy(), k.layers[0].get_weights()[1], atol=1e-6
    )
    np.testing.assert_allclose(
        net[3].weight.detach().numpy().T, k.layers[3].get_weights()[0], atol=1e-6
    )
    np.testing.assert_allclose(
        net[3].bias.detach().numpy(), k.layers[3].get_weights()[1], atol=1e-6
    )
    gamma, beta, mean, var = k.layers[1].get_weights()
    bn = net[1]
    np.testing.assert_allclose(bn.weight.detach().numpy(), gamma, atol=1e-6)
    np.testing.assert_allclose(bn.bias.detach().numpy(), beta, atol=1e-6)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, atol=1e-6)
    if (
        not trainable_bn
    ):  # training BatchNorm: torch keeps the unbiased batch variance, Keras the biased
        np.testing.assert_allclose(bn.running_var.numpy(), var, atol=1e-6)


def assert_history_equal(ours, theirs):
    ours = {k: v for k, v in ours.history.items() if k != "epoch_time"}
    assert set(ours) == set(theirs.history), (sorted(ours), sorted(theirs.history))
    for key, values in theirs.history.items():
        np.testing.assert_allclose(ours[key], values, rtol=1e-4, err_msg=key)


FIT_CASES = [
    ("class_weight", "dense_bn", "sgd"),
    ("class_weight", "bn", "adam"),
    ("sample_weight", "dense_bn", "adam"),
    ("sample_weight", "none", "sgd"),
    ("dataset", "dense_bn", "sgd"),
]


@pytest.mark.parametrize("how, frozen, optimizer", FIT_CASES, ids=["-".join(c) for c in FIT_CASES])
def test_weighted_fit_matches_keras(how, frozen, optimizer, one_thread):
    x, y, sw = data()
    xv, yv, swv = data(1)
    cw = {0: 0.5, 1: 2.0, 2: 1.0}
    net, model, k = build(frozen)
    compile_both(model, k, optimizer)
    common = {"batch_size": BATCH, "epochs": 3, "shuffle": False, "verbose": 0}
    kw = {"class_weight": cw} if how == "class_weight" else {"sample_weight": sw}
    val = (xv, yv, swv) if frozen != "none" else None  # trainable BatchNorm: running stats differ
    kh = k.fit(x, y, validation_data=val, **kw, **common)
    if how == "dataset":
        ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(sw))
        vds = TensorDataset(*(torch.from_numpy(a) for a in (xv, yv, swv)))
        fh = model.fit(ds, validation_data=vds, **common)
    else:
        fh = model.fit(x, y, validation_data=val, **kw, **common)
    assert_weights_equal(net, k, trainable_bn=frozen == "none")
    assert_history_equal(fh, kh)
    assert "weighted_accuracy" in fh.history
    if frozen == "dense_bn":  # the frozen Dense + BatchNorm ran once: later epochs from the cache
        assert model.cache_status["train"].state is CacheState.REUSED
    if val is not None:
        ke = k.evaluate(xv, yv, sample_weight=swv, batch_size=5, return_dict=True, verbose=0)
        fe = model.evaluate(xv, yv, sample_weight=swv, batch_size=5, return_dict=True, verbose=0)
        for key, value in ke.items():
            np.testing.assert_allclose(fe[key], value, rtol=1e-4, err_msg=key)


def test_validation_cadence_and_steps_match_keras(one_thread):
    x, y, sw = data()
    xv, yv, swv = data(1)
    net, model, k = build("dense_bn")
    compile_both(model, k, "adam", weighted=False)
    common = {
        "batch_size": BATCH,
        "epochs": 5,
        "shuffle": False,
        "verbose": 0,
        "sample_weight": sw,
        "validation_data": (xv, yv),
        "steps_per_epoch": 3,  # epochs of 3, 1 (the data ends), 3, 1, 3 batches
        "validation_steps": 2,
        "validation_batch_size": 5,
        "validation_freq": [1, 2, 5],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both say the data ran out
        kh = k.fit(x, y, **common)
    with pytest.warns(UserWarning, match="ran out after 1 of steps_per_epoch=3"):
        fh = model.fit(x, y, **common)
    assert_weights_equal(net, k, trainable_bn=False)
    assert_history_equal(fh, kh)
    assert len(fh.history["val_loss"]) == 3 and len(fh.history["loss"]) == 5
    for step in (1, 3):
        ke = k.evaluate(xv, yv, batch_size=5, steps=step, return_dict=True, verbose=0)
        fe = model.evaluate(xv, yv, batch_size=5, steps=step, return_dict=True, verbose=0)
        np.testing.assert_allclose(fe["loss"], ke["loss"], rtol=1e-4)


def test_validation_freq_int_and_split_with_weights_match_keras(one_thread):
    x, y, sw = data()
    net, model, k = build("bn")
    compile_both(model, k, "sgd")
    common = {"batch_size": BATCH, "epochs": 4, "shuffle": False, "verbose": 0}
    opts = {"sample_weight": sw, "validation_split": 0.25, "validation_freq": 2}
    kh = k.fit(x, y, **opts, **common)
    fh = model.fit(x, y, **opts, **common)
    assert_weights_equal(net, k, trainable_bn=False)
    assert_history_equal(fh, kh)
    assert len(fh.history["val_loss"]) == 2


@pytest.mark.parametrize("how", ["class_weight", "sample_weight"])
def test_weighted_fit_with_cache_equals_without(how, one_thread):
    x, y, sw = data()
    xv, yv, swv = data(1)
    kw = {"class_weight": {0: 3.0, 2: 0.5}} if how == "class_weight" else {"sample_weight": sw}
    results = []
    for cache in (True, False):
        net, model, _ = build("dense_bn")
        model.compile(
            fl.optimizers.Adam(0.01),
            "sparse_categorical_crossentropy",
            metrics=["accuracy"],
            weighted_metrics=["accuracy"],
        )
        h = model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=3,
            validation_data=(xv, yv, swv),
            cache=cache,
            seed=0,
            verbose=0,
            **kw,
        )
        state = model.cache_status["train"].state
        assert (state is CacheState.OFF) is (not cache), state
        results.append((h.history, [p.detach().clone() for p in net.parameters()]))
    (h1, w1), (h2, w2) = results
    for a, b in zip(w1, w2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for key in h1:
        if key != "epoch_time":
            np.testing.assert_allclose(h1[key], h2[key], rtol=1e-6, err_msg=key)


def test_weights_change_the_result(one_thread):
    """The weights reach the loss: class weights of 1 equal no weights; others do not."""
    x, y, _ = data()
    finals = []
    for cw in (None, {0: 1.0, 1: 1.0, 2: 1.0}, {0: 5.0}):
        net, model, _ = build("bn")
        model.compile(fl.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, class_weight=cw)
        finals.append(net[3].weight.detach().clone())
    assert torch.equal(finals[0], finals[1])
    assert not torch.allclose(finals[0], finals[2])
