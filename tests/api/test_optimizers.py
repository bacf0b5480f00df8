"""fl.optimizers without Keras: specs, schedules and their composition with group rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.api import keras_optimizers as ko

schedules = fl.optimizers.schedules
X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = np.random.default_rng(1).integers(0, 3, 32)


def model(spec) -> fl.Model:
    torch.manual_seed(0)
    m = fl.Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)])
    m.compile(spec, loss="sparse_categorical_crossentropy")
    return m


def test_strings_and_specs_build_keras_math_and_torch_classes_keep_torch_math():
    for name in ("sgd", "adam", "adamw", "rmsprop", "adamax", "nadam", "adagrad", "lion"):
        assert isinstance(
            fl.optimizers.get(name).build([{"params": [torch.zeros(1)]}]), ko.KerasOptimizer
        )
    m = model(torch.optim.Adam)
    m.fit(X, Y, epochs=1, batch_size=8, verbose=0)
    assert type(m.optimizer) is torch.optim.Adam


def test_a_keras_optimizer_instance_given_to_compile_keeps_its_configuration():
    sched = schedules.ExponentialDecay(0.1, 2, 0.5)
    inst = ko.Nadam([torch.zeros(1, requires_grad=True)], sched, beta_1=0.8, clipnorm=1.0)
    spec = fl.optimizers.get(inst)
    opt = spec.build([{"params": [torch.zeros(2, requires_grad=True)], "lr": spec.learning_rate}])
    assert type(opt) is ko.Nadam and opt.schedule is sched and opt.clipnorm == 1.0
    assert opt.defaults["beta_1"] == 0.8 and opt.iterations == 0


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: fl.optimizers.SGD(0.1, momentum=1.5), ValueError),
        (lambda: fl.optimizers.SGD(0.1, nesterov=True), ValueError),
        (lambda: fl.optimizers.Adam(-1.0), ValueError),
        (lambda: fl.optimizers.Adam("fast"), TypeError),
        (lambda: fl.optimizers.Adam(1e-3, clipnorm=1.0, clipvalue=0.5), ValueError),
        (lambda: fl.optimizers.RMSprop(1e-3, epsilon=-1.0), ValueError),
        (lambda: fl.optimizers.Lion(1e-3, beta_1=0.0), ValueError),
        (lambda: fl.optimizers.TorchOptimizer(torch.optim.SGD, lr=lambda step: 0.1), TypeError),
        (lambda: schedules.PiecewiseConstantDecay([1, 2], [0.1]), ValueError),
        (lambda: schedules.CosineDecay(0.1, decay_steps=0), ValueError),
    ],
)
def test_bad_options_fail_at_construction_and_say_what_was_given(make, error):
    with pytest.raises(error):
        make()


def test_schedule_rate_is_reported_and_scaled_by_rate_changing_callbacks():
    sched = schedules.ExponentialDecay(0.1, decay_steps=4, decay_rate=0.5)
    m = model(fl.optimizers.SGD(sched))
    assert m.learning_rate == pytest.approx(0.1)
    m.fit(X, Y, epochs=1, batch_size=8, verbose=0)  # 4 steps
    assert m.optimizer.iterations == 4 and m.learning_rate == pytest.approx(0.05)
    m.learning_rate = 0.01  # what ReduceLROnPlateau / LearningRateScheduler do
    assert m.learning_rate == pytest.approx(0.01)
    m.fit(X, Y, epochs=1, batch_size=8, verbose=0)
    assert m.learning_rate == pytest.approx(0.005), "the schedule goes on, scaled by 1/5"


def test_a_group_at_half_the_nominal_rate_follows_half_the_schedule():
    w, v = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    sched = schedules.CosineDecay(0.0, 10, warmup_target=0.2, warmup_steps=2)
    opt = ko.SGD([{"params": [w]}, {"params": [v], "lr": 0.1}], sched)
    for step in range(6):
        full, half = opt.rate(opt.param_groups[0]), opt.rate(opt.param_groups[1])
        assert full == pytest.approx(sched(step)) and half == pytest.approx(sched(step) / 2)
        w.grad, v.grad = torch.ones(1), torch.ones(1)
        opt.step()
    assert v.item() == pytest.approx(w.item() / 2)


def test_iterations_and_slots_survive_state_dict_and_a_layer_joining_later():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = ko.Nadam([a], 0.01)
    for _ in range(3):
        a.grad = torch.ones(3)
        opt.step()
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["iterations"] == 3
    assert opt.param_groups[1]["u_product"] == opt.param_groups[0]["u_product"]
    b.grad, a.grad = torch.ones(2), torch.ones(3)
    opt.step()
    other = ko.Nadam([{"params": [a]}, {"params": [b]}], 0.01)
    other.load_state_dict(opt.state_dict())
    assert other.iterations == 4 and torch.equal(
        other.state[b]["velocity"], opt.state[b]["velocity"]
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Lion"])
def test_frozen_weights_bitwise_unchanged_under_weight_decay(name):
    m = model(getattr(fl.optimizers, name)(0.01, weight_decay=0.5))
    m.layers[0].trainable = False
    frozen = [t.clone() for t in m.layers[0].weights]
    m.fit(X, Y, epochs=2, batch_size=8, verbose=0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, m.layers[0].weights))
    assert not torch.equal(
        m.layers[-1].module.weight, model(fl.optimizers.SGD(0.0)).layers[-1].module.weight
    )


def test_steps_are_vectorised_one_kernel_per_operation_not_per_parameter():
    def foreach_calls(n: int) -> int:
        params = [nn.Parameter(torch.randn(3)) for _ in range(n)]
        opt = ko.Adam(params, 0.01, weight_decay=0.1, global_clipnorm=1.0)
        for p in params:
            p.grad = torch.randn(3)
        with torch.profiler.profile() as prof:
            opt.step()
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::_foreach"))

    few, many = foreach_calls(5), foreach_calls(60)
    assert few == many > 0, f"{few} foreach calls for 5 parameters, {many} for 60"


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_torch_classes_run_the_fused_kernel_with_the_same_result(cls):
    """Unless the options choose an implementation, a torch class with a fused kernel
    runs it (one pass over the weights); training ends where the default kernel ends."""
    kw = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    fused, plain = (
        model(fl.optimizers.TorchOptimizer(cls, lr=0.01, **kw)),
        model(fl.optimizers.TorchOptimizer(cls, lr=0.01, foreach=False, **kw)),
    )
    for m in (fused, plain):
        m.fit(X, Y, epochs=3, batch_size=8, seed=0, verbose=0)
    assert fused.live_optimizer.optimizer.defaults["fused"] is True
    assert not plain.live_optimizer.optimizer.defaults["fused"]
    for a, b in zip(fused.module.parameters(), plain.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_kernel_is_not_chosen_where_it_does_not_apply():
    spec = fl.optimizers.TorchOptimizer(torch.optim.Adam, lr=0.01)
    complex_param = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    assert not spec.build([{"params": [complex_param]}]).defaults["fused"]
    nadam = fl.optimizers.TorchOptimizer(torch.optim.NAdam, lr=0.01)  # no fused kernel
    assert "fused" not in nadam.build([{"params": [torch.zeros(1, requires_grad=True)]}]).defaults


class _Recording(torch.optim.SGD):
    """A torch optimizer with Keras's two fit-time hooks, recording when fit calls them."""

    calls: list[str] = []

    def scale_loss(self, loss):
        _Recording.calls.append("scale_loss")
        return loss * 4.0

    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad /= 4.0
        return super().step(closure)

    def finalize_variable_values(self):
        _Recording.calls.append("finalize")


def test_fit_scales_the_loss_and_finalizes_through_the_optimizer_before_on_train_end():
    class Order(fl.callbacks.Callback):
        def on_train_end(self, logs=None):
            _Recording.calls.append("on_train_end")

    _Recording.calls = []
    m = model(_Recording)
    m.fit(X, Y, epochs=2, batch_size=8, verbose=0, callbacks=[Order()])
    assert _Recording.calls == ["scale_loss"] * 8 + ["finalize", "on_train_end"]
    plain = model(torch.optim.SGD)
    plain.fit(X, Y, epochs=2, batch_size=8, verbose=0)
    for a, b in zip(m.module.parameters(), plain.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # scaled, then divided back
