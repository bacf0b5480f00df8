"""The cache is built under the autocast that fit runs with: one numeric path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl


def _model() -> fl.Model:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    model = fl.wrap(net)
    for i in range(5):
        model.layers[i].trainable = False
    return model


@pytest.mark.parametrize("precision", ["bf16", None])
def test_cached_losses_equal_uncached_under_autocast(precision, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 3, 8, 8)).astype(np.float32) * 3
    y = rng.integers(0, 3, 48)
    losses = {}
    for cache in (True, False):
        model = _model()
        model.compile(
            fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", precision=precision
        )
        h = model.fit(x, y, batch_size=16, epochs=3, cache=cache, seed=1, verbose=2)
        losses[cache] = h.history["loss"]
        log = capsys.readouterr().out
        assert ("cache: reused" in log) == cache, log
        assert model.module[-1].weight.dtype == torch.float32
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6, atol=0)
