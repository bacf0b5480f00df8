"""compile() starts a fresh optimizer: fresh state, one rate, per-parameter rates cleared."""

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl


def test_compile_clears_per_parameter_rates_and_later_unfreeze_rates_apply():
    torch.manual_seed(0)
    m = fl.Sequential([nn.Linear(4, 4), nn.Linear(4, 2)])
    m.layers[0].trainable = False
    m.unfreeze(fl.select.first(1), learning_rate=1e-5)
    m.compile(fl.optimizers.Adam(1e-2), loss="mse")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    m.fit(x, y, epochs=1, verbose=0)
    assert [g["lr"] for g in m.optimizer.param_groups] == [pytest.approx(1e-2)]
    m.layers[0].trainable = False
    m.fit(x, y, epochs=1, verbose=0)
    m.unfreeze(fl.select.first(1), learning_rate=1e-5)  # after compile: its own rate
    m.fit(x, y, epochs=1, verbose=0)
    assert sorted(g["lr"] for g in m.optimizer.param_groups) == [
        pytest.approx(1e-5),
        pytest.approx(1e-2),
    ]
