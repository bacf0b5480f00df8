"""Keras 3 optimizer math: frostline's torch optimizers against real Keras, step by step.

A two-layer MLP with the same initial weights and data in torch and Keras (TensorFlow
backend, float32) is trained for 4 epochs of 3 batches with each optimizer under
several scenarios; the final weights must agree within 1e-6 (float32 throughout).

Scenarios: plain; first layer frozen from the start (not given to the optimizer, so
it must stay bitwise unchanged while weight decay runs); first layer unfrozen after
two epochs (joins with fresh slots at the optimizer's current ``iterations``, as a
variable that a pre-built Keras optimizer had not updated yet); the optimizer's
momentum options; weight decay with a frozen layer; gradient clipping; schedules.
"""

from __future__ import annotations

import contextlib
import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import frostline as fl  # noqa: E402
from frostline.api import lr_schedules  # noqa: E402

with contextlib.suppress(Exception):  # triton before TensorFlow (see tests/conftest.py)
    import torch._dynamo  # noqa: E402, F401

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.keras

EPOCHS, BATCH, N = 4, 8, 24
UNFREEZE_AT = 2 * (N // BATCH)  # step at which the first layer joins

#: optimizer -> (learning rate, momentum-style options)
OPTIMIZERS = {
    "SGD": (0.1, {"momentum": 0.9, "nesterov": True}),
    "Adam": (0.01, {"amsgrad": True, "beta_1": 0.8}),
    "AdamW": (0.01, {"amsgrad": True, "beta_1": 0.8}),
    "RMSprop": (0.01, {"momentum": 0.5, "centered": True}),
    "Adamax": (0.01, {"beta_1": 0.8, "beta_2": 0.99}),
    "Nadam": (0.01, {"beta_1": 0.8}),
    "Adagrad": (0.1, {"initial_accumulator_value": 0.5}),
    "Lion": (0.003, {"beta_1": 0.8, "beta_2": 0.95}),
}
SCENARIOS = ["plain", "frozen", "unfreeze", "momentum", "weight_decay"]


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype("float32")
    y = rng.normal(size=(N, 3)).astype("float32")
    return x, y


def torch_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def keras_model(net: nn.Sequential):
    L = keras.layers
    model = keras.Sequential([keras.Input((4,)), L.Dense(6, activation="tanh"), L.Dense(3)])
    for k_layer, t_layer in zip(model.layers, (net[0], net[2])):
        k_layer.set_weights(
            [t_layer.weight.detach().numpy().T.copy(), t_layer.bias.detach().numpy().copy()]
        )
    return model


def options(name: str, scenario: str) -> dict:
    lr, momentum = OPTIMIZERS[name]
    opts: dict = {"learning_rate": lr}
    if scenario == "momentum":
        opts.update(momentum)
    if scenario == "weight_decay":
        opts["weight_decay"] = 0.1
    return opts


def first_frozen(scenario: str, step: int) -> bool:
    if scenario in ("frozen", "weight_decay"):
        return True
    return scenario == "unfreeze" and step < UNFREEZE_AT


def run_torch(name: str, opts: dict, scenario: str, lr_torch=None, finalize_at=()):
    """Train with our optimizer; ``finalize_at``: steps after which to call
    ``finalize_variable_values`` (what the end of a ``fit`` does)."""
    net = torch_model()
    first, rest = list(net[0].parameters()), list(net[2].parameters())
    opts = dict(opts)
    lr = opts.pop("learning_rate") if lr_torch is None else lr_torch
    opts.pop("learning_rate", None)
    frozen0 = first_frozen(scenario, 0)
    for p in first:
        p.requires_grad_(not frozen0)
    opt = getattr(fl.optimizers, name)(lr, **opts).build(rest if frozen0 else first + rest)
    before = [p.detach().clone() for p in first]
    x, y = (torch.from_numpy(a) for a in data())
    step = 0
    for _ in range(EPOCHS):
        for i in range(0, N, BATCH):
            if frozen0 and not first_frozen(scenario, step) and not first[0].requires_grad:
                for p in first:
                    p.requires_grad_(True)
                opt.add_param_group({"params": first})
            loss = nn.functional.mse_loss(net(x[i : i + BATCH]), y[i : i + BATCH])
            opt.scale_loss(loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step in finalize_at:
                opt.finalize_variable_values()
    assert opt.iterations == step // (opts.get("gradient_accumulation_steps") or 1)
    if scenario in ("frozen", "weight_decay"):
        assert all(torch.equal(a, b) for a, b in zip(before, first)), "a frozen weight changed"
    return [t.detach().numpy() for layer in (net[0], net[2]) for t in (layer.weight, layer.bias)]


def run_keras(
    name: str, opts: dict, scenario: str, net: nn.Sequential, finalize_at=(), exclude=None
):
    """Real Keras: the same steps as Keras's ``train_step`` (``scale_loss``, ``apply``);
    ``exclude(optimizer, model)`` configures weight-decay exclusions before the build."""
    model = keras_model(net)
    opt = getattr(keras.optimizers, name)(**opts)
    first = model.layers[0].trainable_variables
    everything = list(model.trainable_variables)
    if exclude is not None:
        exclude(opt, model)
    opt.build(everything)  # one optimizer over every variable, updated on a subset
    loss_fn = keras.losses.MeanSquaredError()
    x, y = data()
    step = 0
    for _ in range(EPOCHS):
        for i in range(0, N, BATCH):
            variables = everything
            if first_frozen(scenario, step):
                variables = [v for v in everything if all(v is not f for f in first)]
            with tf.GradientTape() as tape:
                loss = opt.scale_loss(loss_fn(y[i : i + BATCH], model(x[i : i + BATCH])))
            grads = tape.gradient(loss, variables)
            opt.apply(grads, variables)
            step += 1
            if step in finalize_at:
                opt.finalize_variable_values(everything)
    assert int(opt.iterations) == step // (opts.get("gradient_accumulation_steps") or 1)
    out = []
    for layer in model.layers:
        kernel, bias = layer.get_weights()
        out += [kernel.T, bias]
    return out


def compare(ours, theirs, atol=1e-6):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_matches_keras(name, scenario, one_thread):
    opts = options(name, scenario)
    ours = run_torch(name, opts, scenario)
    if name == "AdamW" and "weight_decay" not in opts:
        opts["weight_decay"] = 0.004  # Keras's AdamW default, ours too
    theirs = run_keras(name, opts, scenario, torch_model())
    compare(ours, theirs)


@pytest.mark.parametrize(
    "name, clip",
    [
        ("Adam", {"clipnorm": 0.05}),
        ("SGD", {"global_clipnorm": 0.1}),
        ("RMSprop", {"clipvalue": 0.02}),
    ],
)
def test_gradient_clipping_matches_keras(name, clip, one_thread):
    opts = {**options(name, "momentum"), **clip}
    compare(run_torch(name, opts, "plain"), run_keras(name, opts, "plain", torch_model()))


SCHEDULES = {
    "ExponentialDecay": ((0.1, 3, 0.5), {"staircase": True}),
    "CosineDecay": ((0.0, 6), {"warmup_target": 0.1, "warmup_steps": 4, "alpha": 0.1}),
    "PiecewiseConstantDecay": (([3, 7], [0.1, 0.05, 0.01]), {}),
    "PolynomialDecay": ((0.1, 8), {"end_learning_rate": 0.01, "power": 2.0}),
    "InverseTimeDecay": ((0.1, 2, 0.5), {}),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_schedules_match_keras(name, schedule, one_thread):
    args, kwargs = SCHEDULES[schedule]
    ours = getattr(lr_schedules, schedule)(*args, **kwargs)
    theirs = getattr(keras.optimizers.schedules, schedule)(*args, **kwargs)
    for step in range(14):
        assert ours(step) == pytest.approx(float(theirs(step)), rel=1e-6, abs=1e-9)
    opts = {**options(name, "momentum"), "weight_decay": 0.05}
    got = run_torch(name, opts, "unfreeze", lr_torch=ours)
    want = run_keras(name, {**opts, "learning_rate": theirs}, "unfreeze", torch_model())
    compare(got, want)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_formulas_match_keras_in_float64(name):
    """In float64 rounding is out of the way: what is left would be a formula difference."""
    lr, momentum = OPTIMIZERS[name]
    keras.backend.set_floatx("float64")
    try:
        var = keras.Variable(np.array([1.0, -2.0, 0.5]))
        theirs = getattr(keras.optimizers, name)(learning_rate=lr, weight_decay=0.1, **momentum)
        theirs.build([var])
        w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        ours = getattr(fl.optimizers, name)(lr, weight_decay=0.1, **momentum).build([w])
        rng = np.random.default_rng(1)
        for _ in range(10):
            g = rng.normal(size=3) * rng.choice([1e-3, 1.0, 10.0])
            theirs.apply([tf.constant(g)], [var])
            w.grad = torch.from_numpy(g)
            ours.step()
        np.testing.assert_allclose(w.detach().numpy(), var.numpy(), atol=1e-8, rtol=0)
    finally:
        keras.backend.set_floatx("float32")


#: Keras's base options, each against real Keras (with EMA, the weights end as their averages)
KERAS_OPTIONS = {
    "ema": {"use_ema": True, "ema_momentum": 0.9},
    "ema_overwrite": {"use_ema": True, "ema_momentum": 0.8, "ema_overwrite_frequency": 3},
    "accumulation": {"gradient_accumulation_steps": 2},
    "accumulation_5": {"gradient_accumulation_steps": 5},  # 12 steps: ends mid-accumulation
    "accumulation_ema": {
        "gradient_accumulation_steps": 3,
        "use_ema": True,
        "ema_momentum": 0.7,
        "ema_overwrite_frequency": 2,
    },
    "loss_scale": {"loss_scale_factor": 3.0},
}
LAST = EPOCHS * N // BATCH


@pytest.mark.parametrize("option", list(KERAS_OPTIONS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_keras_options_match_keras_across_an_unfreeze(name, option, one_thread):
    """The first layer joins mid-run (step 6, mid-accumulation for N=5 and N=4), momentum
    options and weight decay on; weights finalized at the end as ``fit`` does."""
    opts = {**options(name, "momentum"), "weight_decay": 0.05, **KERAS_OPTIONS[option]}
    ours = run_torch(name, opts, "unfreeze", finalize_at={LAST})
    theirs = run_keras(name, opts, "unfreeze", torch_model(), finalize_at={LAST})
    compare(ours, theirs)


@pytest.mark.parametrize("option", list(KERAS_OPTIONS))
@pytest.mark.parametrize("name", ["SGD", "Adam", "Nadam"])
def test_keras_options_keep_a_frozen_layer_bitwise_and_match_keras(name, option, one_thread):
    """First layer frozen throughout under weight decay (run_torch asserts it bitwise)."""
    opts = {**options(name, "weight_decay"), **KERAS_OPTIONS[option]}
    ours = run_torch(name, opts, "weight_decay", finalize_at={LAST // 2, LAST})
    theirs = run_keras(name, opts, "weight_decay", torch_model(), finalize_at={LAST // 2, LAST})
    compare(ours, theirs)


@pytest.mark.parametrize("schedule", ["ExponentialDecay", "PiecewiseConstantDecay"])
def test_schedules_see_every_step_under_accumulation_as_in_keras(schedule, one_thread):
    args, kwargs = SCHEDULES[schedule]
    opts = {**options("SGD", "momentum"), "gradient_accumulation_steps": 3}
    got = run_torch(
        "SGD", opts, "unfreeze", lr_torch=getattr(lr_schedules, schedule)(*args, **kwargs)
    )
    theirs = getattr(keras.optimizers.schedules, schedule)(*args, **kwargs)
    want = run_keras("SGD", {**opts, "learning_rate": theirs}, "unfreeze", torch_model())
    compare(got, want)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"use_ema": True, "ema_momentum": 0.8, "gradient_accumulation_steps": 2},
        {"loss_scale_factor": 1024.0, "ema_overwrite_frequency": 5, "use_ema": True},
        {"exclude_names": ["bias"]},
        {"exclude_last_kernel": True, "gradient_accumulation_steps": 4},
    ],
    ids=["plain", "ema-accumulation", "loss-scale-ema", "exclude-names", "exclude-var"],
)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fit_with_unfreeze_matches_keras(name, extra, one_thread):
    """End to end: an ``fl.optimizers.X``, ``compile`` and ``fit``, first layer unfrozen
    between two fits without recompiling, momentum options, weight decay and Keras's
    options on; each ``fit`` ends by finalizing the weights (EMA), as Keras's does."""
    extra = dict(extra)
    names = extra.pop("exclude_names", None)
    last_kernel = extra.pop("exclude_last_kernel", False)
    lr, momentum = OPTIMIZERS[name]
    opts = {"learning_rate": lr, "weight_decay": 0.05, **momentum, **extra}
    net = torch_model()
    model = fl.wrap(net)
    model.layers[0].trainable = False
    spec = getattr(fl.optimizers, name)(
        lr, **{k: v for k, v in opts.items() if k != "learning_rate"}
    )
    if names or last_kernel:
        spec.exclude_from_weight_decay(
            var_list=[net[2].weight] if last_kernel else None, var_names=names
        )
    model.compile(optimizer=spec, loss="mse")
    x, y = data()
    frozen = [p.detach().clone() for p in net[0].parameters()]
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, net[0].parameters()))
    model.layers[0].trainable = True
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS - 2, shuffle=False, verbose=0)
    assert model.optimizer.iterations == LAST // (extra.get("gradient_accumulation_steps") or 1)
    ours = [t.detach().numpy() for layer in (net[0], net[2]) for t in (layer.weight, layer.bias)]

    def exclude(opt, kmodel):
        opt.exclude_from_weight_decay(
            var_list=[kmodel.layers[1].kernel] if last_kernel else None, var_names=names
        )

    theirs = run_keras(
        name, opts, "unfreeze", torch_model(), finalize_at={UNFREEZE_AT, LAST}, exclude=exclude
    )
    compare(ours, theirs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_signatures_and_defaults_are_keras(name):
    """Same arguments, order and defaults as Keras 3 (SGD's ``weight_decay=0.0`` is the
    SPEC's, the same math as Keras's None); ``get_config`` names every argument."""
    import inspect

    def arguments(cls):
        params = inspect.signature(cls.__init__).parameters.values()
        return [(p.name, p.default) for p in params if p.name not in ("self", "kwargs")]

    want = arguments(getattr(keras.optimizers, name))
    if name == "SGD":
        want = [(k, 0.0 if k == "weight_decay" else v) for k, v in want]
    assert arguments(getattr(fl.optimizers, name)) == want
    ours = getattr(fl.optimizers, name)().get_config()
    theirs = getattr(keras.optimizers, name)().get_config()
    assert set(theirs) - {"name"} <= set(ours) - {"class"}


@pytest.mark.parametrize("name, overwrite", [("SGD", None), ("Adam", 3), ("Nadam", None)])
def test_fit_with_ema_accumulation_and_loss_scale_matches_keras_fit(name, overwrite, one_thread):
    """Against Keras's own ``model.fit`` (its train_step, its end-of-fit EMA copy): first
    layer frozen, 4 epochs, EMA (the end-of-fit copy decides the weights), 5-step
    accumulation, loss scaling."""
    lr, momentum = OPTIMIZERS[name]
    opts = {
        "learning_rate": lr,
        "weight_decay": 0.05,
        **momentum,
        "use_ema": True,
        "ema_momentum": 0.8,
        "ema_overwrite_frequency": overwrite,
        "gradient_accumulation_steps": 5,
        "loss_scale_factor": 4.0,
    }
    net = torch_model()
    model = fl.wrap(net)
    model.layers[0].trainable = False
    spec = getattr(fl.optimizers, name)(**opts)
    model.compile(optimizer=spec, loss="mse")
    x, y = data()
    frozen = [p.detach().clone() for p in net[0].parameters()]
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, net[0].parameters()))
    ours = [t.detach().numpy() for layer in (net[0], net[2]) for t in (layer.weight, layer.bias)]

    kmodel = keras_model(torch_model())
    kmodel.layers[0].trainable = False
    kmodel.compile(optimizer=getattr(keras.optimizers, name)(**opts), loss="mse")
    khistory = kmodel.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    theirs = []
    for layer in kmodel.layers:
        kernel, bias = layer.get_weights()
        theirs += [kernel.T, bias]
    compare(ours, theirs)
    np.testing.assert_allclose(history.history["loss"], khistory.history["loss"], rtol=1e-4)
    assert model.optimizer.iterations == int(kmodel.optimizer.iterations) == LAST // 5
