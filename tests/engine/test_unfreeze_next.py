"""``fit(unfreeze_next=...)``: phase 1's cache build keeps the frozen values phase 2 needs.

The next fit reuses them only when they are its own cache: same frontier, data, frozen
weights, BatchNorm statistics mode, and the same frozen values on the example batch.
Every reuse must give the losses of ``cache=False``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import hf_bert
from torch import nn

import frostline as fl
from frostline.engine.activations import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")


class Doubler(nn.Module):
    """A deterministic layer whose output depends on its mode (no weights)."""

    def forward(self, x):
        return x * 2 if self.training else x


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.ReLU(),
        Doubler(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def data(seed: int = 0, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)


def builds(monkeypatch) -> list:
    """Every cache build over the data (one per fit and role that ran its frozen part)."""
    calls: list = []
    real = ActivationStore.build_many.__func__

    def counted(cls, *args, **kwargs):
        calls.append(1)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(ActivationStore, "build_many", classmethod(counted))
    return calls


class EvalAtEpochBegin(fl.callbacks.Callback):
    """Puts a layer in eval mode after fit put the model in train mode."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def on_epoch_begin(self, epoch, logs=None):
        self.layer.eval()


def two_fits(module: nn.Sequential, cache, between=None, plan: bool = True, x2=None, **kw):
    """Phase 1 (head only) then phase 2 (layer '5' unfrozen too); ``between(module)``
    returns phase 2's callbacks."""
    x, y = data()
    model = fl.wrap(module)
    model.trainable = False
    model.get_layer("7").trainable = True
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    extra = {"unfreeze_next": model.get_layer("5")} if plan else {}
    h1 = model.fit(x, y, batch_size=8, epochs=2, seed=0, verbose=0, cache=cache, **extra, **kw)
    callbacks = between(module) if between is not None else None
    model.get_layer("5").trainable = True
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x2 = x if x2 is None else x2
    h2 = model.fit(
        x2, y, batch_size=8, epochs=2, seed=0, verbose=0, cache=cache, callbacks=callbacks, **kw
    )
    return h1.history["loss"] + h2.history["loss"], model


def test_the_next_fit_starts_from_the_values_kept_by_the_first(monkeypatch) -> None:
    reference, _ = two_fits(net(), cache=False)
    calls = builds(monkeypatch)
    losses, model = two_fits(net(), cache="auto")
    assert len(calls) == 1  # the frozen part ran over the data once, for both fits
    status = model.cache_status["train"]
    assert status.state.value == "reused" and status.boundary == ("4",)
    np.testing.assert_allclose(losses, reference, rtol=1e-6)
    # without the plan, phase 2 builds its own cache: same losses
    calls.clear()
    plain, _ = two_fits(net(), cache="auto", plan=False)
    assert len(calls) == 2
    np.testing.assert_allclose(plain, reference, rtol=1e-6)


def edit_in_place(p: nn.Parameter) -> None:
    p.data.add_(0.5)  # hidden from the version counter: the content digest sees it


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: edit_in_place(m[3].weight), id="frozen-weight-edited-in-place"),
        pytest.param(lambda m: [EvalAtEpochBegin(m[2])], id="mode-that-changes-the-frozen-values"),
    ],
)
def test_kept_values_that_no_longer_hold_are_not_served(change, monkeypatch) -> None:
    reference, _ = two_fits(net(), cache=False, between=change)
    calls = builds(monkeypatch)
    losses, model = two_fits(net(), cache="auto", between=change)
    assert len(calls) == 2  # phase 2 ran its frozen part again
    assert model.cache_status["train"].boundary == ("4",)
    np.testing.assert_allclose(losses, reference, rtol=1e-6)


def test_other_data_in_the_next_fit_is_not_served_kept_values(monkeypatch) -> None:
    x2, _ = data(seed=1)
    reference, _ = two_fits(net(), cache=False, x2=x2)
    calls = builds(monkeypatch)
    losses, _ = two_fits(net(), cache="auto", x2=x2)
    assert len(calls) == 2
    np.testing.assert_allclose(losses, reference, rtol=1e-6)


def test_kept_values_serve_the_next_fit_only(monkeypatch) -> None:
    x, y = data()
    module = net()
    model = fl.wrap(module)
    model.trainable = False
    model.get_layer("7").trainable = True
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, unfreeze_next=model.get_layer("5"))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # head only again: its own cache
    assert model.cache_status["train"].boundary == ("6",)
    calls = builds(monkeypatch)
    model.get_layer("5").trainable = True
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert len(calls) == 1  # the values kept two fits ago are gone


def test_the_planned_values_never_push_the_cache_to_disk(monkeypatch, tmp_path) -> None:
    """A budget that holds this fit's cache but not both: nothing is kept for the next."""
    x, y = data(n=40)
    per_sample = 16 * 4  # one frontier row: 16 float32
    calls = builds(monkeypatch)
    model = fl.wrap(net())
    model.trainable = False
    model.get_layer("7").trainable = True
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        unfreeze_next=model.get_layer("5"),
        cache_memory_bytes=40 * per_sample + 8,
        cache_dir=tmp_path,
    )
    assert model.cache_status["train"].location == "memory"
    model.get_layer("5").trainable = True
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, cache_memory_bytes=40 * per_sample + 8)
    assert len(calls) == 3  # with both (spilled: dropped), alone, and phase 2's own


def test_hugging_face_model_in_inference_mode_reuses_across_a_retrace(monkeypatch) -> None:
    """BERT's attention reads ``self.training``: phase 2 traces again (the unfrozen layer
    trains in train mode), and the kept values still serve (checked on the example)."""
    g = torch.Generator().manual_seed(0)
    x = {
        "input_ids": torch.randint(3, 100, (24, 12), generator=g).numpy(),
        "attention_mask": np.ones((24, 12), dtype=np.int64),
    }
    y = np.arange(24) % 3

    def run(cache) -> tuple[list, object]:
        torch.manual_seed(0)
        module = hf_bert()
        model = fl.wrap(module)
        model.trainable = False
        model.get_layer("classifier").trainable = True
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        last = model.get_layer("bert.encoder.layer.1")
        kw = dict(batch_size=8, epochs=2, seed=0, verbose=0, frozen_inference=True, cache=cache)
        h1 = model.fit(x, y, unfreeze_next=last, **kw)
        last.trainable = True
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        h2 = model.fit(x, y, **kw)
        return h1.history["loss"] + h2.history["loss"], model

    reference, _ = run(False)
    calls = builds(monkeypatch)
    losses, model = run("auto")
    assert len(calls) == 1
    assert model.cache_status["train"].state.value == "reused"
    np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_two_phase_plans_its_own_unfreeze(monkeypatch) -> None:
    x, y = data()
    calls = builds(monkeypatch)
    module = net()
    model = fl.Sequential([fl.wrap(module[:7], name="base"), module[7]])
    r = fl.recipes.two_phase(
        model,
        "base",
        x,
        y,
        unfreeze=1,
        phase1_epochs=2,
        phase2_epochs=2,
        loss="sparse_categorical_crossentropy",
        batch_size=8,
        verbose=0,
        seed=0,
    )
    assert r.unfreeze_plan.paths == ["5"]
    assert len(calls) == 1


def test_unfreeze_next_says_what_it_expects() -> None:
    x, y = data()
    model = fl.wrap(net())
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(TypeError, match="unfreeze_next must be a Layer.*got str"):
        model.fit(x, y, epochs=1, verbose=0, unfreeze_next="5")


def test_validation_data_reuses_its_own_kept_values(monkeypatch) -> None:
    xv, yv = data(seed=2, n=16)

    def run(cache) -> tuple[dict, object]:
        x, y = data()
        model = fl.wrap(net())
        model.trainable = False
        model.get_layer("7").trainable = True
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        kw = dict(batch_size=8, epochs=2, seed=0, verbose=0, cache=cache, validation_data=(xv, yv))
        h1 = model.fit(x, y, unfreeze_next=model.get_layer("5"), **kw)
        model.evaluate(xv, yv, verbose=0)  # between the fits: keeps nothing from being reused
        model.get_layer("5").trainable = True
        h2 = model.fit(x, y, **kw)
        return {k: h1.history[k] + h2.history[k] for k in ("loss", "val_loss")}, model

    reference, _ = run(False)
    calls = builds(monkeypatch)
    history, model = run("auto")
    assert model.cache_status["train"].state.value == "reused"
    assert model.cache_status["val"].state.value == "reused"
    # train and validation once each in phase 1 (evaluate's own role builds once more)
    assert len(calls) <= 3
    for k in ("loss", "val_loss"):
        np.testing.assert_allclose(history[k], reference[k], rtol=1e-6)
