"""fl.optimizers without Keras: specs, schedules and their composition with group rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.api.optimizers.base import KerasTorchOptimizer

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
            fl.optimizers.get(name).build([{"params": [torch.zeros(1)]}]), KerasTorchOptimizer
        )
    m = model(torch.optim.Adam)
    m.fit(X, Y, epochs=1, batch_size=8, verbose=0)
    assert type(m.optimizer) is torch.optim.Adam


def test_a_keras_optimizer_instance_given_to_compile_keeps_its_configuration():
    sched = schedules.ExponentialDecay(0.1, 2, 0.5)
    inst = fl.optimizers.Nadam(sched, beta_1=0.8, clipnorm=1.0).build(
        [torch.zeros(1, requires_grad=True)]
    )
    spec = fl.optimizers.get(inst)
    opt = spec.build([{"params": [torch.zeros(2, requires_grad=True)], "lr": spec.learning_rate}])
    assert type(opt.spec) is fl.optimizers.Nadam and opt.spec is not inst.spec
    assert opt.schedule is sched and opt.spec.clipnorm == 1.0
    assert opt.spec.beta_1 == 0.8 and opt.iterations == 0


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
    opt = fl.optimizers.SGD(sched).build([{"params": [w]}, {"params": [v], "lr": 0.1}])
    for step in range(6):
        full, half = opt.rate(opt.param_groups[0]), opt.rate(opt.param_groups[1])
        assert full == pytest.approx(sched(step)) and half == pytest.approx(sched(step) / 2)
        w.grad, v.grad = torch.ones(1), torch.ones(1)
        opt.step()
    assert v.item() == pytest.approx(w.item() / 2)


def test_iterations_and_slots_survive_state_dict_and_a_layer_joining_later():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = fl.optimizers.Nadam(0.01).build([a])
    for _ in range(3):
        a.grad = torch.ones(3)
        opt.step()
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["iterations"] == 3
    assert opt.param_groups[1]["u_product"] == opt.param_groups[0]["u_product"]
    b.grad, a.grad = torch.ones(2), torch.ones(3)
    opt.step()
    other = fl.optimizers.Nadam(0.01).build([{"params": [a]}, {"params": [b]}])
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
        opt = fl.optimizers.Adam(0.01, weight_decay=0.1, global_clipnorm=1.0).build(params)
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


KERAS_OPTIONS = {
    "use_ema": True,
    "ema_momentum": 0.9,
    "ema_overwrite_frequency": 4,
    "gradient_accumulation_steps": 3,
    "loss_scale_factor": 8.0,
    "weight_decay": 0.1,
}


class _FreezeThaw(fl.callbacks.Callback):
    """Epoch 1: the middle layer freezes; epoch 2: the first layer (frozen so far) thaws."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.model.layers[2].trainable = False
        if epoch == 2:
            self.model.layers[0].trainable = True


def _three_layers(spec) -> fl.Model:
    torch.manual_seed(0)
    m = fl.Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)])
    m.layers[0].trainable = False
    m.compile(spec, loss="sparse_categorical_crossentropy")
    return m


@pytest.mark.parametrize("name", ["SGD", "Adam", "Nadam", "Lion"])
def test_frozen_weights_stay_bitwise_under_every_keras_option_across_freeze_and_thaw(name):
    """Layer 0 frozen until epoch 2, layer 2 frozen from epoch 1: each keeps its exact
    values while frozen, through EMA overwrites, accumulation and the final EMA copy."""

    class Check(_FreezeThaw):
        def on_epoch_begin(self, epoch, logs=None):
            super().on_epoch_begin(epoch, logs)
            if epoch == 1:
                self.middle = [t.clone() for t in self.model.layers[2].weights]

        def on_train_batch_end(self, batch, logs=None):
            if self.model.layers[0].weights[0].requires_grad is False:
                assert all(torch.equal(a, b) for a, b in zip(first, self.model.layers[0].weights))

    m = _three_layers(getattr(fl.optimizers, name)(0.01, **KERAS_OPTIONS))
    first = [t.clone() for t in m.layers[0].weights]
    check = Check()
    m.fit(X, Y, epochs=3, batch_size=4, verbose=0, callbacks=[check])  # 8 steps an epoch
    assert all(torch.equal(a, b) for a, b in zip(check.middle, m.layers[2].weights))
    assert not all(torch.equal(a, b) for a, b in zip(first, m.layers[0].weights))


def test_resume_is_bitwise_with_ema_and_accumulation_state_in_the_checkpoint(tmp_path):
    """5 accumulation steps over 8 batches an epoch: checkpoints fall mid-accumulation."""

    def run(epochs, **kw):
        spec = fl.optimizers.AdamW(0.01, **{**KERAS_OPTIONS, "gradient_accumulation_steps": 5})
        m = _three_layers(spec)
        m.fit(X, Y, epochs=epochs, batch_size=4, verbose=0, seed=1, callbacks=[_FreezeThaw()], **kw)
        return m

    full = run(4)
    run(2, checkpoint_dir=tmp_path)  # ends (and finalizes) after epoch index 1
    resumed = run(4, resume=tmp_path)
    for (k, a), (_, b) in zip(
        full.module.state_dict().items(), resumed.module.state_dict().items()
    ):
        assert torch.equal(a, b), k
    assert resumed.optimizer.iterations == full.optimizer.iterations == 32 // 5
    tensors, _ = resumed.live_optimizer.state_dict()
    ours = full.live_optimizer.state_dict()[0]
    assert tensors.keys() == ours.keys()
    assert any(k.endswith("/gradient_accumulator") for k in tensors)
    assert any(k.endswith("/average") for k in tensors)
    assert all(torch.equal(tensors[k], ours[k]) for k in tensors)


def test_exclude_from_weight_decay_by_name_and_by_weight():
    def decayed(**exclude) -> list[bool]:
        spec = fl.optimizers.SGD(0.1, weight_decay=0.5)
        m = model(spec)
        if exclude:
            spec.exclude_from_weight_decay(**{k: v(m) for k, v in exclude.items()})
        before = [p.detach().clone() for p in m.module.parameters()]
        for p in m.module.parameters():
            p.register_hook(lambda g: torch.zeros_like(g))  # no gradient: decay alone moves it
        m.fit(X, Y, epochs=1, batch_size=32, verbose=0)
        return [not torch.equal(a, b) for a, b in zip(before, m.module.parameters())]

    assert decayed() == [True, True, True, True]
    assert decayed(var_names=lambda m: ["bias"]) == [True, False, True, False]
    assert decayed(var_list=lambda m: [m.layers[-1].module.weight]) == [True, True, False, True]
    assert decayed(var_names=lambda m: ["^linear\\."]) == [False, False, True, True]  # a regex


def test_exclude_from_weight_decay_is_configured_before_the_build():
    spec = fl.optimizers.AdamW(1e-3)
    m = model(spec)
    m.fit(X, Y, epochs=1, batch_size=32, verbose=0)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        spec.exclude_from_weight_decay(var_names=["bias"])
    with pytest.raises(TypeError, match="var_names"):
        fl.optimizers.AdamW().exclude_from_weight_decay(var_names="bias")


@pytest.mark.parametrize(
    "option, error",
    [
        ({"gradient_accumulation_steps": 1}, ValueError),
        ({"gradient_accumulation_steps": 2.0}, ValueError),
        ({"use_ema": True, "ema_momentum": 1.5}, ValueError),
        ({"use_ema": True, "ema_overwrite_frequency": 0}, ValueError),
        ({"use_ema": "yes"}, TypeError),
        ({"loss_scale_factor": -1.0}, ValueError),
        ({"name": 3}, TypeError),
    ],
)
def test_bad_keras_options_fail_at_construction_and_say_what_was_given(option, error):
    (key, value), *_ = [(k, v) for k, v in option.items() if k != "use_ema"] or option.items()
    with pytest.raises(error, match=key):
        fl.optimizers.Adam(1e-3, **option)


def test_accumulation_counts_iterations_as_keras_and_the_rate_follows_every_step():
    sched = schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    m = model(fl.optimizers.SGD(sched, momentum=0.9, gradient_accumulation_steps=2))
    m.fit(X, Y, epochs=1, batch_size=8, verbose=0)  # 4 steps, 2 updates
    assert m.optimizer.iterations == 2 and m.optimizer.schedule_step == 4
    assert m.learning_rate == pytest.approx(0.1 * 0.5**4)
    # momentum and the accumulator
    assert m.live_optimizer.state_numel() == 2 * sum(p.numel() for p in m.module.parameters())
