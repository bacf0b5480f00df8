"""fl.FrozenFeatures: fit's activation cache (same keys, same invalidation) for a plain loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import frostline as fl
from frostline.engine.runner import CacheState

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_data():
    torch.manual_seed(0)
    model = fl.wrap(
        nn.Sequential(
            nn.Linear(6, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.Linear(16, 3),
        )
    )
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)


def train(model, x, y, *, cached: bool, epochs: int = 3):
    model.trainable = False
    model.layers[-1].trainable = True
    opt = torch.optim.SGD(model.trainable_weights, lr=0.1, momentum=0.9)
    fl.track(opt, model)
    feats = fl.FrozenFeatures(model, x, y) if cached else None
    states = []
    for epoch in range(epochs):
        if epoch == 2:
            model.unfreeze("4")
        if feats is not None:
            states.append(feats.refresh().state)
        for idx in torch.arange(64).split(16):
            opt.zero_grad()
            out = feats.trainable(*feats.inputs(idx)) if feats else model(x[idx])
            nn.functional.cross_entropy(out, y[idx]).backward()
            opt.step()
    return states


def test_a_loop_on_cached_features_trains_like_the_plain_loop():
    plain, x, y = model_and_data()
    train(plain, x, y, cached=False)
    cached, _, _ = model_and_data()
    states = train(cached, x, y, cached=True)
    # built when constructed, reused each epoch, rebuilt at the shallower frontier the unfreeze left
    assert states == [CacheState.REUSED, CacheState.REUSED, CacheState.BUILT]
    for (k, a), b in zip(plain.module.state_dict().items(), cached.module.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_a_frozen_weight_that_changes_is_never_served_stale():
    model, x, y = model_and_data()
    model.layers[0].trainable = False
    model.layers[2].trainable = False
    feats = fl.FrozenFeatures(model, x, y)
    idx = torch.arange(10)
    assert feats.status.cached and feats.boundary == ("3",)
    with torch.no_grad():
        model.module[0].weight.add_(0.5)  # in place, behind the cache's back
    out = feats.trainable(*feats.inputs(idx))
    assert torch.allclose(out, model(x[idx]), atol=1e-6)
    assert feats.status.state is CacheState.BUILT  # rebuilt from the new weights


def test_freezing_more_extends_the_cache_and_outputs_stay_the_models():
    model, x, y = model_and_data()
    model.layers[0].trainable = False
    feats = fl.FrozenFeatures(model, x, y, batch_size=16)
    assert feats.boundary == ("1",)
    model.layers[2].trainable = False
    assert feats.refresh().state is CacheState.EXTENDED
    assert feats.boundary == ("3",)
    idx = torch.tensor([3, 7, 60])
    assert torch.allclose(feats.trainable(*feats.inputs(idx)), model(x[idx]), atol=1e-6)
    assert torch.equal(feats.targets(idx), y[idx])


def test_cache_off_computes_the_frozen_part_per_batch_and_says_why():
    model, x, y = model_and_data()
    model.layers[0].trainable = False
    feats = fl.FrozenFeatures(model, TensorDataset(x, y), cache=False)
    assert feats.status.state is CacheState.OFF and "cache=False" in str(feats.status)
    idx = torch.arange(5)
    assert torch.allclose(feats.trainable(*feats.inputs(idx)), model(x[idx]), atol=1e-6)
    feats.close()


def test_bad_inputs_say_what_was_given():
    model, x, y = model_and_data()
    with pytest.raises(TypeError, match="random access"):
        fl.FrozenFeatures(model, DataLoader(TensorDataset(x, y), batch_size=8))
    with pytest.raises(TypeError, match="torch.nn.Module or a frostline"):
        fl.FrozenFeatures("model", x, y)
    with pytest.raises(fl.DataError, match="batch_size"):
        fl.FrozenFeatures(model, x, y, batch_size=0)
