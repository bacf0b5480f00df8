"""Random augmentation in front of a frozen base: fresh draws, and the folded fast path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import frostline as fl
from frostline.engine.fuse import inference_copy, replay_draws
from frostline.engine.runner import Runner


def _base() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():  # non-trivial statistics, so folding is exercised
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _guide_model(dropout: bool = False) -> tuple[fl.Model, fl.Model]:
    base = fl.wrap(_base(), name="base")
    layers = [fl.layers.RandomFlip("horizontal"), fl.layers.RandomRotation(0.1), base]
    layers += [nn.Dropout(0.2)] if dropout else []
    model = fl.Sequential([*layers, nn.Linear(8, 3)])
    base.trainable = False
    return model, base


def _data(n: int = 40):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3, 12, 12)).astype(np.float32), rng.integers(0, 3, n)


def test_replay_draws_repeats_every_generator_and_consumes_none():
    import random

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with replay_draws() as again:
        first = (torch.rand(2), random.random(), np.random.rand())
        again()
        second = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    after = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]


def test_frozen_part_with_random_augmentation_runs_folded_and_exact():
    model, _ = _guide_model()
    runner = Runner(model.module)
    x = torch.from_numpy(_data()[0][:8])
    runner.verify(x)
    assert runner.part is not None and runner.part.random  # the flips are in the frozen part
    torch.manual_seed(5)
    (fast,) = runner.run_prefix(x)
    assert (
        runner.executor.fused is not None and runner.executor.fused.folded
    )  # BatchNorm really folded
    torch.manual_seed(5)
    with torch.no_grad():
        ref = model.module[2](model.module[1](model.module[0](x)))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    (again,) = runner.run_prefix(x)
    assert not torch.allclose(again, fast)  # fresh draws on every run


class _Flip(nn.Module):
    """Flips each sample at random in training mode (the copy's eval mode turns it off)."""

    def forward(self, x):
        if not self.training:
            return x
        draw = torch.rand(x.shape[0]) < 0.5
        return torch.where(draw[:, None, None, None], x.flip(-1), x)


def test_the_copy_of_a_random_part_is_checked_against_the_part_as_set():
    """On the same draws, a copy that changes what a random layer does is refused."""
    body = nn.Sequential(_Flip(), *_base()[:3])
    body[2].eval()  # the frozen BatchNorm on running statistics, as fit runs it
    x = torch.randn(8, 3, 12, 12)
    with replay_draws() as again, torch.no_grad():
        reference = body(x)
        again()
        assert inference_copy(body, example=x, reference=reference) is None
    body[0].eval()  # the same layer inactive: the copy computes what the part does
    with torch.no_grad():
        reference = body(x)
    assert inference_copy(body, example=x, reference=reference) is not None


def _hand_loop(x, y, epochs: int, seed: int) -> list[float]:
    """The plain model trained eagerly: the base frozen and in eval mode."""
    model, base = _guide_model()
    net = model.module
    fl.seed_everything(seed)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    base.module.eval()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for i in range(0, len(xs), 8):
            loss = F.cross_entropy(net(xs[i : i + 8]), ys[i : i + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xs[i : i + 8])
        losses.append(total / len(xs))
    return losses


@pytest.mark.parametrize("cache", [True, False])
def test_fit_with_augmentation_equals_the_plain_model(cache, capsys):
    x, y = _data()
    model, _ = _guide_model()
    model.compile(fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    h = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, cache=cache, seed=7, verbose=2)
    assert "reused" not in capsys.readouterr().out  # augmented values are never cached
    assert model._trainer.runner.executor.fused is None  # fit's end drops the folded view
    np.testing.assert_allclose(h.history["loss"], _hand_loop(x, y, 3, 7), rtol=1e-4)


def test_augment_views_caches_k_augmented_passes_and_cycles_them(capsys):
    """With a learning rate of 0 an epoch's loss depends only on the values the frozen part
    gives: epoch e repeats view e % K exactly, and the K views differ from each other."""
    x, y = _data()
    model, _ = _guide_model()
    model.compile(fl.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    h = model.fit(x, y, batch_size=8, epochs=5, seed=3, verbose=2, augment_views=2)
    log = capsys.readouterr().out
    notes = [
        line.split("cache: ")[1].split(" (")[0] for line in log.splitlines() if "cache:" in line
    ]
    assert notes == ["built", "built", "reused", "reused", "reused"], log
    assert "(augmented view 2 of 2)" in log.splitlines()[1]
    loss = h.history["loss"]
    np.testing.assert_allclose(loss[2:], [loss[0], loss[1], loss[0]], rtol=1e-6)
    assert abs(loss[0] - loss[1]) > 1e-4  # two different draws
    fresh = model.fit(x, y, batch_size=8, epochs=3, seed=3, verbose=0).history["loss"]
    assert len({round(v, 6) for v in fresh}) == 3  # without views: a fresh draw each epoch


def test_augment_views_must_be_a_positive_int():
    x, y = _data(8)
    model, _ = _guide_model()
    model.compile("sgd", loss="sparse_categorical_crossentropy")
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(
            ValueError, match=f"augment_views must be None or an int >= 1, got {bad!r}"
        ):
            model.fit(x, y, epochs=1, verbose=0, augment_views=bad)


def test_a_generator_the_model_holds_is_replayed_too():
    """Augmentation drawing from its own torch.Generator folds as well, and the check
    leaves that generator where it was."""
    g = torch.Generator().manual_seed(0)
    base = fl.wrap(_base(), name="base")
    model = fl.Sequential([fl.layers.RandomFlip(generator=g), base, nn.Linear(8, 3)])
    base.trainable = False
    runner = Runner(model.module)
    x = torch.randn(8, 3, 12, 12)
    runner.verify(x)
    state = g.get_state()
    (fast,) = runner.run_prefix(x)
    assert runner.executor.fused is not None and runner.executor.fused.folded
    g.set_state(state)
    with torch.no_grad():
        ref = model.module[1](model.module[0](x))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
