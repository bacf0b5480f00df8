"""Training guarantees (SPEC 6-9) and the Keras-style compile/fit surface.

Each guarantee test is written so that it would fail on the naive PyTorch approach it
replaces; where that is cheap, the naive approach is run inside the test and shown to
fail the same assertion.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import frostline as fl
from frostline.api.optimizers.base import KerasTorchOptimizer

# ------------------------------------------------------------------------- helpers

N, D, C = 32, 4, 3


def data(n: int = N, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, D)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5).astype("int64")  # 3 classes
    return x, y


def mlp(seed: int = 0) -> fl.Sequential:
    torch.manual_seed(seed)
    return fl.Sequential([nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, C)])


def plain_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, C))


def snap(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def moved(a, b) -> bool:
    return all(not torch.equal(x, y) for x, y in zip(a, b, strict=True))


def params(layer) -> list[torch.Tensor]:
    return list(layer.module.parameters())


def group_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


class Recorder(fl.Callback):
    """Snapshots of a layer's weights at the end of every training batch."""

    def __init__(self, layer_index: int, action=None, at_batch: int | None = None) -> None:
        self.layer_index = layer_index
        self.action = action
        self.at_batch = at_batch
        self.snaps: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, batch, logs=None):
        self.snaps.append(snap(params(self.model.layers[self.layer_index])))
        if self.action is not None and batch == self.at_batch:
            self.action(self.model)


SPEC_OPTIMIZERS = {
    "sgd-momentum": lambda: fl.optimizers.SGD(0.1, momentum=0.9),
    "sgd-nesterov": lambda: fl.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "sgd-weight-decay": lambda: fl.optimizers.SGD(0.1, weight_decay=0.05),
    "sgd-momentum-wd": lambda: fl.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.05),
    "adam": lambda: fl.optimizers.Adam(0.01),
    "adamw": lambda: fl.optimizers.AdamW(0.01, weight_decay=0.1),
    "rmsprop-momentum": lambda: fl.optimizers.RMSprop(0.01, momentum=0.9),
}
TORCH_OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "sgd-weight-decay": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.05),
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "rmsprop-momentum": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9),
}


def naive_steps(
    net: nn.Module, opt: torch.optim.Optimizer, steps: int, *, set_to_none: bool
) -> None:
    x, y = data()
    xs, ys = torch.from_numpy(x).split(8), torch.from_numpy(y).split(8)
    for i in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(net(xs[i % len(xs)]), ys[i % len(ys)]).backward()
        opt.step()


# ================================================= SPEC 6: no stale compile


@pytest.mark.parametrize("recompile", [False, True], ids=["no-compile", "compile"])
def test_unfreeze_between_fits_trains_the_base(recompile):
    x, y = data()
    model = mlp()
    base = model.layers[0]
    base.trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    before = snap(params(base))
    base.trainable = True
    if recompile:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert moved(before, params(base)), "the unfrozen layer must train at the next step"

    # naive PyTorch: an optimizer built while the base was frozen never updates it
    net = plain_mlp()
    net[0].requires_grad_(False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    naive_steps(net, opt, 2, set_to_none=True)
    net[0].requires_grad_(True)
    before = snap(net[0].parameters())
    naive_steps(net, opt, 2, set_to_none=True)
    assert equal(before, net[0].parameters()), "naive: the stale optimizer ignores the unfreeze"


def test_unfreeze_from_callback_mid_epoch_takes_effect_at_next_step():
    x, y = data()
    model = mlp()
    model.layers[0].trainable = False
    w0 = snap(params(model.layers[0]))

    def unfreeze(m):
        m.layers[0].trainable = True

    rec = Recorder(0, unfreeze, at_batch=2)
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0, callbacks=[rec])
    assert len(rec.snaps) == 8
    assert [equal(w0, s) for s in rec.snaps] == [True] * 3 + [False] * 5
    # each later step moved it again
    assert all(moved(a, b) for a, b in zip(rec.snaps[3:], rec.snaps[4:]))


@pytest.mark.parametrize("name", list(SPEC_OPTIMIZERS))
def test_freeze_from_callback_mid_epoch_stops_at_next_step(name):
    x, y = data()
    model = mlp()

    def freeze(m):
        m.layers[0].trainable = False

    rec = Recorder(0, freeze, at_batch=2)
    model.compile(optimizer=SPEC_OPTIMIZERS[name](), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0, callbacks=[rec])
    assert len(rec.snaps) == 16
    assert moved(rec.snaps[0], rec.snaps[1]) and moved(rec.snaps[1], rec.snaps[2])
    frozen_at = rec.snaps[2]
    assert all(equal(frozen_at, s) for s in rec.snaps[3:]), (
        "bitwise unchanged from the next step on"
    )
    assert equal(frozen_at, params(model.layers[0]))
    assert all(p not in model.optimizer.state for p in params(model.layers[0]))

    # naive: requires_grad_(False) mid-run with a zero_grad(set_to_none=False) loop keeps moving
    net = plain_mlp()
    opt = TORCH_OPTIMIZERS[name](net.parameters())
    naive_steps(net, opt, 3, set_to_none=False)
    net[0].requires_grad_(False)
    frozen_at = snap(net[0].parameters())
    naive_steps(net, opt, 3, set_to_none=False)
    assert not equal(frozen_at, net[0].parameters()), (
        "naive: momentum / weight decay move a frozen weight"
    )


def test_compile_builds_a_new_optimizer():
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    first = model.optimizer
    head = model.layers[-1].module.weight
    assert first.iterations == 4
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert model.optimizer is not first
    assert model.optimizer.iterations == 4, "fresh state after compile, as in Keras"
    assert model.optimizer.state[head]["momentum"] is not first.state[head]["momentum"]


def test_plain_pytorch_requires_grad_changes_are_seen_by_fit():
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.module[0].requires_grad_(False)  # frozen the PyTorch way, no frostline setter
    before = snap(params(model.layers[0]))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert equal(before, params(model.layers[0]))
    model.module[0].requires_grad_(True)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert moved(before, params(model.layers[0]))


def _conv_net() -> fl.Sequential:
    torch.manual_seed(0)
    net = fl.Sequential(
        [
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, C),
        ]
    )
    for bn in (net.module[1], net.module[4]):
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return net


def _eval_loss(model: fl.Model, x, y) -> float:
    was = model.module.training
    model.module.eval()
    try:
        with torch.no_grad():
            return float(F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))
    finally:
        model.module.train(was)


def test_forward_is_unchanged_by_freezing_and_the_frozen_prefix():
    # SPEC 5 (and 4): with the conv/BN part frozen, fit's forward is the eval forward of
    # the same weights (frozen BN on running stats); lr=0 makes every epoch see the same loss
    rng = np.random.default_rng(0)
    x = rng.random((16, 3, 8, 8), dtype=np.float32)
    y = np.arange(16) % C
    model = _conv_net()
    model.freeze(fl.select.first(4))
    model.compile(optimizer=fl.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=3, batch_size=4, shuffle=False, verbose=0)
    expected = _eval_loss(model, x, y)
    assert history.history["loss"] == pytest.approx([expected] * 3, rel=1e-5)
    assert model.evaluate(x, y, verbose=0) == pytest.approx(expected, rel=1e-5)


def test_boundary_moves_during_fit_keep_the_forward_exact():
    # progressive unfreezing and re-freezing from on_epoch_begin: the frozen prefix (and
    # its cache) moves back and forth; with lr=0 every epoch must see the same loss
    rng = np.random.default_rng(0)
    x = rng.random((16, 3, 8, 8), dtype=np.float32)
    y = np.arange(16) % C
    model = _conv_net()
    model.freeze(fl.select.first(4))
    plan = {1: ("unfreeze", 2), 2: ("freeze", 4), 3: ("unfreeze", 4), 4: ("freeze", 2)}

    class Schedule(fl.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch in plan:
                action, k = plan[epoch]
                getattr(self.model, action)(
                    fl.select.last(k) if action == "unfreeze" else fl.select.first(k)
                )

    model.set_batchnorm_mode(
        "inference"
    )  # unfrozen BNs keep running stats too: lr=0 changes nothing
    model.compile(optimizer=fl.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    history = model.fit(
        x, y, epochs=5, batch_size=4, shuffle=False, verbose=0, callbacks=[Schedule()]
    )
    expected = _eval_loss(model, x, y)
    assert history.history["loss"] == pytest.approx([expected] * 5, rel=1e-5)


def test_unfreeze_in_on_train_batch_begin_applies_to_that_step():
    x, y = data()
    model = mlp()
    model.layers[0].trainable = False
    w0 = snap(params(model.layers[0]))

    class AtBegin(Recorder):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                self.model.layers[0].trainable = True

    rec = AtBegin(0)
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0, callbacks=[rec])
    assert [equal(w0, s) for s in rec.snaps] == [True] * 2 + [False] * 6


def test_changed_frozen_weights_and_data_are_never_served_stale():
    rng = np.random.default_rng(0)
    x = rng.random((16, 3, 8, 8), dtype=np.float32)
    y = np.arange(16) % C
    model = _conv_net()
    model.freeze(fl.select.first(4))
    model.compile(optimizer=fl.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)

    def check():
        h = model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
        expected = _eval_loss(model, x, y)
        assert h.history["loss"][0] == pytest.approx(expected, rel=1e-5)
        assert model.evaluate(x, y, verbose=0) == pytest.approx(expected, rel=1e-5)

    with torch.no_grad():
        model.module[0].weight.mul_(2.0)  # a frozen weight changed in place
    check()
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[key] = state[key] * 0.5
    model.module.load_state_dict(state)  # frozen weights loaded
    check()
    with torch.no_grad():
        model.module[1].running_mean.add_(1.0)  # a frozen BN's statistics
    check()
    x[:] = rng.random(x.shape, dtype=np.float32)  # the same array, new contents
    check()


# ================================================= SPEC 7: frozen means frozen


@pytest.mark.parametrize("name", list(SPEC_OPTIMIZERS))
def test_frozen_from_the_start_is_bitwise_unchanged(name):
    x, y = data()
    model = mlp()
    model.layers[2].trainable = False  # a middle layer: gradients flow through it
    before = snap(params(model.layers[2]))
    first = snap(params(model.layers[0]))
    model.compile(optimizer=SPEC_OPTIMIZERS[name](), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert equal(before, params(model.layers[2]))
    assert moved(first, params(model.layers[0])), "layers before the frozen one still train"
    assert all(p.grad is None for p in params(model.layers[2]))


@pytest.mark.parametrize("name", list(SPEC_OPTIMIZERS))
def test_weights_with_optimizer_state_stay_bitwise_frozen(name):
    x, y = data()
    model = mlp()
    model.compile(optimizer=SPEC_OPTIMIZERS[name](), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    layer = model.layers[2]
    if name != "sgd-weight-decay":  # plain SGD keeps no state
        assert all(model.optimizer.state.get(p) for p in params(layer))
    layer.trainable = False
    before = snap(params(layer))
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert equal(before, params(layer))
    assert all(p not in model.optimizer.state for p in params(layer)), (
        "state of frozen weights is dropped"
    )

    # naive: one optimizer over all parameters, requires_grad_(False), zero_grad(set_to_none=False)
    net = plain_mlp()
    opt = TORCH_OPTIMIZERS[name](net.parameters())
    naive_steps(net, opt, 4, set_to_none=False)
    net[2].requires_grad_(False)
    before = snap(net[2].parameters())
    naive_steps(net, opt, 4, set_to_none=False)
    assert not equal(before, net[2].parameters())


@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adamw", "rmsprop-momentum"])
def test_custom_loop_with_stale_optimizer_cannot_move_frozen_weights(name):
    # a hand-written loop over model.trainable_weights; the optimizer is never rebuilt
    model = mlp()
    net = model.module
    opt = TORCH_OPTIMIZERS[name](model.trainable_weights)
    naive_steps(net, opt, 4, set_to_none=False)
    model.layers[2].trainable = False  # frostline drops .grad on freeze
    assert all(p.grad is None for p in params(model.layers[2]))
    before = snap(params(model.layers[2]))
    head = snap(params(model.layers[4]))
    naive_steps(net, opt, 4, set_to_none=False)
    assert equal(before, params(model.layers[2]))
    assert moved(head, params(model.layers[4]))

    # the same loop with plain requires_grad_(False) moves the "frozen" weights
    naive = plain_mlp()
    opt = TORCH_OPTIMIZERS[name](naive.parameters())
    naive_steps(naive, opt, 4, set_to_none=False)
    naive[2].requires_grad_(False)
    before = snap(naive[2].parameters())
    naive_steps(naive, opt, 4, set_to_none=False)
    assert not equal(before, naive[2].parameters())


def test_frozen_weights_verified_after_fit():
    x, y = data()
    model = mlp()
    model.layers[0].trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    assert model.last_verification is not None and model.last_verification.ok


# ================================================= SPEC 8: state survives


class OptimizerProbe(fl.Callback):
    def __init__(self) -> None:
        self.at_begin: torch.optim.Optimizer | None = None
        self.state_at_begin: dict = {}
        self.lrs_at_begin: list = []

    def on_train_begin(self, logs=None):
        opt = self.model.optimizer
        self.at_begin = opt
        self.state_at_begin = {p: dict(s) for p, s in opt.state.items()}
        self.values_at_begin = {
            p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
            for p, s in opt.state.items()
        }
        self.lrs_at_begin = [g["lr"] for g in opt.param_groups]


def test_adam_state_of_trainable_params_survives_freeze_and_unfreeze_of_others():
    x, y = data()
    model = mlp()
    model.compile(optimizer=fl.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # 4 steps
    opt = model.optimizer
    head_w = model.layers[-1].module.weight
    first_w = model.layers[0].module.weight
    exp_avg = opt.state[head_w]["momentum"]  # Keras's names for Adam's moments
    exp_avg_value = exp_avg.clone()
    exp_avg_sq_value = opt.state[head_w]["velocity"].clone()

    model.layers[0].trainable = False
    probe = OptimizerProbe()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[probe])
    assert probe.at_begin is opt and model.optimizer is opt, (
        "no rebuild when the trainable set changes"
    )
    # after the optimizer was brought in line with the new trainable set, before any step:
    assert probe.state_at_begin[head_w]["momentum"] is exp_avg, "the very same moment tensor"
    assert torch.equal(probe.values_at_begin[head_w]["momentum"], exp_avg_value)
    assert torch.equal(probe.values_at_begin[head_w]["velocity"], exp_avg_sq_value)
    assert first_w not in probe.state_at_begin, "the frozen parameter's state is gone"
    assert opt.iterations == 8, "moments and the step count carried on"

    model.layers[0].trainable = True
    probe = OptimizerProbe()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[probe])
    assert opt.iterations == 12
    assert first_w not in probe.state_at_begin, "newly unfrozen parameters start fresh"
    assert probe.state_at_begin[head_w]["momentum"] is exp_avg
    assert first_w in opt.state
    assert model.optimizer is opt


class WithAux(nn.Module):
    """A body and head, plus an auxiliary layer the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(D, 8)
        self.head = nn.Linear(8, C)
        self.aux = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_surviving_state_matches_an_uninterrupted_run():
    # toggling another layer every step must not perturb the Adam trajectory of the rest
    x, y = data()
    model, ref = fl.wrap(WithAux()), fl.wrap(WithAux())
    ref.get_layer("aux").trainable = False

    class Toggle(fl.Callback):
        def on_train_batch_end(self, batch, logs=None):
            aux = self.model.get_layer("aux")
            aux.trainable = not aux.trainable

    for m, cbs in ((model, [Toggle()]), (ref, [])):
        m.compile(optimizer=fl.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
        m.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=cbs)
    assert model.optimizer is not None and model._live.changes > 3, "the trainable set did change"
    for name in ("body", "head"):
        for a, b in zip(model.get_layer(name).weights, ref.get_layer(name).weights):
            assert torch.equal(a, b), name
            sa, sb = model.optimizer.state[a], ref.optimizer.state[b]
            assert torch.equal(sa["momentum"], sb["momentum"]) and torch.equal(
                sa["velocity"], sb["velocity"]
            )
    assert model.optimizer.iterations == ref.optimizer.iterations == 12


def test_unfreeze_with_its_own_learning_rate():
    x, y = data()
    model = mlp()
    model.trainable = False
    model.layers[-1].trainable = True
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    plan = model.unfreeze(fl.select.first(1), learning_rate=1e-5)
    assert plan.paths == ["linear"]
    before = snap(params(model.layers[0]))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    opt = model.optimizer
    first = model.layers[0].module.weight
    head = model.layers[-1].module.weight
    assert group_of(opt, first)["lr"] == pytest.approx(1e-5)
    assert group_of(opt, head)["lr"] == pytest.approx(0.1)
    delta = max((a - b).abs().max().item() for a, b in zip(before, params(model.layers[0])))
    assert 0 < delta < 1e-4, "moved, gently"
    # the headline rate scales every group, keeping the ratio
    model.learning_rate = 0.05
    assert group_of(opt, first)["lr"] == pytest.approx(5e-6)
    assert group_of(opt, head)["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError):
        model.unfreeze(fl.select.first(1), learning_rate=-1.0)


def test_lambda_lr_keeps_working_when_groups_are_added():
    x, y = data()
    model = mlp()
    model.trainable = False
    model.layers[-1].trainable = True
    model.compile(
        optimizer=fl.optimizers.SGD(0.1),
        loss="sparse_categorical_crossentropy",
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e),
    )
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert [g["lr"] for g in model.optimizer.param_groups] == pytest.approx([0.025])
    model.unfreeze(fl.select.first(1), learning_rate=0.01)
    probe = OptimizerProbe()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[probe])
    first = model.layers[0].module.weight
    head = model.layers[-1].module.weight
    assert sorted(probe.lrs_at_begin) == pytest.approx([0.0025, 0.025])
    opt = model.optimizer
    assert group_of(opt, head)["lr"] == pytest.approx(0.0125)
    assert group_of(opt, first)["lr"] == pytest.approx(0.00125)


def test_one_cycle_lr_keeps_working_when_groups_are_added():
    x, y = data()
    total = 40

    def factory(opt):
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=total, cycle_momentum=False
        )

    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = factory(ref_opt)
    expected = []
    for _ in range(12):
        ref_opt.step()
        ref.step()
        expected.append(ref_opt.param_groups[0]["lr"])

    class Lrs(fl.Callback):
        def __init__(self) -> None:
            self.seen: list = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append([g["lr"] for g in self.model.optimizer.param_groups])

    model = mlp()
    model.trainable = False
    model.layers[-1].trainable = True
    model.compile(
        optimizer=fl.optimizers.SGD(0.1),
        loss="sparse_categorical_crossentropy",
        scheduler=factory,
        scheduler_interval="step",
    )
    cb = Lrs()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    model.layers[2].trainable = True  # a new group mid-schedule
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert len(cb.seen) == 12
    assert [len(s) for s in cb.seen] == [1] * 4 + [2] * 8
    for lrs, want in zip(cb.seen, expected):
        assert lrs == pytest.approx([want] * len(lrs))


# ================================================= SPEC 9: no silent no-ops


def test_fit_with_nothing_trainable_says_so():
    x, y = data()
    model = mlp()
    model.trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(fl.TrainingError, match="nothing to train.*frozen"):
        model.fit(x, y, verbose=0)


def test_freezing_everything_from_a_callback_raises_at_the_next_step():
    x, y = data()
    model = mlp()

    def freeze_all(m):
        m.trainable = False

    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(fl.TrainingError, match="nothing to train"):
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[Recorder(0, freeze_all, at_batch=1)])


def test_labels_out_of_range_name_the_range():
    x, _ = data()
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"\[0, 2\].*3 outputs.*\[0, 4\]"):
        model.fit(x, np.arange(N) % 5, verbose=0)
    with pytest.raises(ValueError, match=r"\[0, 2\].*\[-1, 2\]"):
        model.fit(x, (np.arange(N) % 4) - 1, verbose=0)
    binary = fl.Sequential([nn.Linear(D, 1)])
    binary.compile(optimizer="adam", loss="binary_crossentropy")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binary.fit(x, np.full((N, 1), 2.0, "float32"), verbose=0)


def test_x_y_length_mismatch():
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(fl.DataError, match="x has 32 samples but y has 30"):
        model.fit(x, y[:30], verbose=0)
    with pytest.raises(fl.DataError, match="x has 32 samples but y has 30"):
        model.evaluate(x, y[:30], verbose=0)


def test_input_shape_error_names_the_layer_and_the_expectation():
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(fl.DataError, match=r"\(None, 5\).*'linear' \(Linear\).*4 features"):
        model.fit(np.zeros((N, 5), "float32"), y, verbose=0)
    cnn = fl.Sequential(
        [nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)]
    )
    cnn.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    nhwc = np.random.rand(8, 16, 16, 3).astype("float32")
    with pytest.raises(fl.DataError) as info:
        cnn.fit(nhwc, np.arange(8) % 2, verbose=0)
    msg = str(info.value)
    assert "(None, 16, 16, 3)" in msg and "'conv2d' (Conv2d)" in msg and "3 input channels" in msg
    assert "channels-last" in msg and "transpose(0, 3, 1, 2)" in msg
    with pytest.raises(fl.DataError, match="channels-last"):
        cnn.predict(nhwc)
    emb = fl.Sequential([nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)])
    emb.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(fl.DataError, match=r"integer token ids in \[0, 9\]"):
        emb.fit(np.random.rand(8, 2).astype("float32"), np.arange(8) % 2, verbose=0)


def test_nan_loss_names_epoch_and_batch():
    x, y = data()
    calls = {"n": 0}

    def flaky(y_pred, y_true):
        calls["n"] += 1
        loss = F.cross_entropy(y_pred, y_true)
        return loss * float("nan") if calls["n"] == 6 else loss

    model = mlp()
    model.compile(optimizer="adam", loss=flaky)
    with pytest.raises(fl.TrainingError, match=r"epoch 2, batch 2"):
        model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    calls["n"] = 0
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, on_nan="stop")
    assert len(history.history["loss"]) == 2 and model.stop_training


def test_nan_inputs_are_rejected_with_their_position():
    x, y = data()
    x[5, 1] = np.nan
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(fl.DataError, match="NaN.*sample 5"):
        model.fit(x, y, verbose=0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(optimizer="adamx", loss="mse"), r"unknown optimizer 'adamx'.*'adam'"),
        (dict(optimizer="adam", loss="msee"), r"unknown loss 'msee'.*'mse'"),
        (
            dict(optimizer="adam", loss="mse", metrics=["acc_x"]),
            r"unknown metric 'acc_x'.*'accuracy'",
        ),
        (dict(optimizer="adam"), r"needs a loss"),
    ],
)
def test_bad_compile_strings(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        mlp().compile(**kwargs)


def test_fit_before_compile_and_bad_arguments():
    x, y = data()
    model = mlp()
    with pytest.raises(fl.TrainingError, match="compile"):
        model.fit(x, y, verbose=0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(fl.DataError, match="batch_size"):
        model.fit(x, y, batch_size=0, verbose=0)
    with pytest.raises(fl.DataError, match="validation_split"):
        model.fit(x, y, validation_split=1.5, verbose=0)
    with pytest.raises(TypeError, match="optimizer"):
        model.compile(optimizer=3, loss="mse")


# ================================================= the Keras-style surface


@pytest.mark.parametrize(
    "name, cls",
    [
        ("adam", fl.optimizers.Adam),
        ("adamw", fl.optimizers.AdamW),
        ("sgd", fl.optimizers.SGD),
        ("rmsprop", fl.optimizers.RMSprop),
        ("adamax", fl.optimizers.Adamax),
        ("nadam", fl.optimizers.Nadam),
        ("adagrad", fl.optimizers.Adagrad),
        ("lion", fl.optimizers.Lion),
    ],
)
def test_keras_optimizer_strings(name, cls):
    x, y = data()
    model = mlp()
    model.compile(optimizer=name, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    before = snap(model.weights)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert type(model.optimizer.spec) is cls  # Keras math, that optimizer's update
    assert moved(before, model.weights)
    assert len(history.history["loss"]) == 2 and len(history.history["accuracy"]) == 2
    # Keras defaults
    assert model.learning_rate == pytest.approx(0.01 if name == "sgd" else 0.001)


def _loss_case(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, D)).astype("float32")
    if name == "sparse_categorical_crossentropy":
        y = rng.integers(0, C, 24)
        return x, y, C, lambda out, t: F.cross_entropy(out, t.long())
    if name == "categorical_crossentropy":
        y = np.eye(C, dtype="float32")[rng.integers(0, C, 24)]
        return x, y, C, lambda out, t: F.cross_entropy(out, t)
    if name == "binary_crossentropy":
        y = rng.integers(0, 2, (24, 1)).astype("float32")
        return x, y, 1, F.binary_cross_entropy_with_logits
    y = rng.normal(size=(24, 2)).astype("float32")
    fn = {"mse": F.mse_loss, "mae": F.l1_loss, "huber": F.huber_loss}[name]
    return x, y, 2, fn


@pytest.mark.parametrize(
    "name",
    [
        "sparse_categorical_crossentropy",
        "categorical_crossentropy",
        "binary_crossentropy",
        "mse",
        "mae",
        "huber",
    ],
)
def test_keras_loss_strings(name):
    x, y, out_dim, reference = _loss_case(name)
    torch.manual_seed(0)
    model = fl.Sequential([nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, out_dim)])
    model.compile(optimizer="adam", loss=name)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    # the evaluated loss equals the torch formula (the model ends in logits)
    with torch.no_grad():
        expected = float(reference(model(torch.from_numpy(x)), torch.from_numpy(y)))
    assert model.evaluate(x, y, verbose=0, batch_size=24) == pytest.approx(expected, rel=1e-5)


def test_probability_outputs_are_detected_for_cross_entropy():
    x, y = data()
    torch.manual_seed(0)
    model = fl.Sequential([nn.Linear(D, C), nn.Softmax(dim=1)])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with torch.no_grad():
        probs = model(torch.from_numpy(x))
    expected = float(F.nll_loss(probs.log(), torch.from_numpy(y)))
    assert model.evaluate(x, y, verbose=0, batch_size=N) == pytest.approx(expected, rel=1e-5)


def test_accuracy_metric_matches_argmax():
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=1, verbose=0)
    loss, acc = model.evaluate(x, y, verbose=0)
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    assert acc == pytest.approx(float((pred == y).mean()))
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "accuracy"} and logs["loss"] == pytest.approx(loss)


@pytest.mark.parametrize(
    "optimizer, cls, lr",
    [
        (torch.optim.SGD, torch.optim.SGD, None),
        (functools.partial(torch.optim.NAdam, lr=0.02), torch.optim.NAdam, 0.02),
        (torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.03), torch.optim.Adam, 0.03),
        (fl.optimizers.RMSprop(0.004, momentum=0.5), KerasTorchOptimizer, 0.004),
    ],
    ids=["class", "partial", "instance", "spec"],
)
def test_torch_optimizer_objects(optimizer, cls, lr):
    x, y = data()
    model = mlp()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    before = snap(model.weights)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert type(model.optimizer) is cls
    assert moved(before, model.weights)
    if lr is not None:
        assert [g["lr"] for g in model.optimizer.param_groups] == pytest.approx([lr])


@pytest.mark.parametrize(
    "loss",
    [nn.CrossEntropyLoss(), F.cross_entropy, lambda p, t: F.nll_loss(F.log_softmax(p, 1), t)],
    ids=["module", "function", "lambda"],
)
def test_loss_callables(loss):
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss=loss)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 2
    with torch.no_grad():
        expected = float(F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))
    assert model.evaluate(x, y, verbose=0, batch_size=N) == pytest.approx(expected, rel=1e-5)


def test_loss_callable_must_return_a_scalar():
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss=lambda p, t: F.cross_entropy(p, t, reduction="none"))
    with pytest.raises(ValueError, match="scalar"):
        model.fit(x, y, verbose=0)


def _inputs(kind: str):
    x, y = data()
    if kind == "numpy":
        return dict(x=x, y=y)
    if kind == "tensor":
        return dict(x=torch.from_numpy(x), y=torch.from_numpy(y))
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    if kind == "dataset":
        return dict(x=ds)
    return dict(x=DataLoader(ds, batch_size=8, shuffle=True))


@pytest.mark.parametrize("kind", ["numpy", "tensor", "dataset", "dataloader"])
def test_fit_evaluate_predict_on_every_input_kind(kind):
    model = mlp()
    model.compile(
        optimizer=fl.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    before = snap(model.weights)
    history = model.fit(
        **_inputs(kind), epochs=2, batch_size=None if kind == "dataloader" else 8, verbose=0
    )
    assert moved(before, model.weights)
    assert len(history.history["loss"]) == 2 and len(history.history["accuracy"]) == 2
    loss, acc = model.evaluate(**_inputs(kind), verbose=0)
    assert np.isfinite(loss) and 0 <= acc <= 1
    x, _ = data()
    if kind in ("numpy", "tensor"):
        pred = model.predict(_inputs(kind)["x"])
    else:
        pred = model.predict(_inputs("dataset")["x"])
    assert isinstance(pred, np.ndarray) and pred.shape == (N, C)
    with torch.no_grad():
        assert np.allclose(pred, model(torch.from_numpy(x)).numpy(), atol=1e-6)


def test_validation_split_and_history_keys():
    x, y = data(40)
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=3, batch_size=8, validation_split=0.25, verbose=0)
    h = history.history
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(h)
    assert all(len(h[k]) == 3 for k in ("loss", "accuracy", "val_loss", "val_accuracy"))
    assert model.history is history
    # Keras: the last fraction of the samples, taken before shuffling
    val_loss, val_acc = model.evaluate(x[30:], y[30:], verbose=0)
    assert h["val_loss"][-1] == pytest.approx(val_loss, rel=1e-5)
    assert h["val_accuracy"][-1] == pytest.approx(val_acc)


@pytest.mark.parametrize("kind", ["tuple", "dataset", "dataloader"])
def test_validation_data(kind):
    x, y = data()
    xv, yv = data(16, seed=1)
    val = {
        "tuple": (xv, yv),
        "dataset": TensorDataset(torch.from_numpy(xv), torch.from_numpy(yv)),
        "dataloader": DataLoader(
            TensorDataset(torch.from_numpy(xv), torch.from_numpy(yv)), batch_size=4
        ),
    }[kind]
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=2, batch_size=8, validation_data=val, verbose=0)
    assert len(history.history["val_loss"]) == 2
    assert history.history["val_loss"][-1] == pytest.approx(
        model.evaluate(xv, yv, verbose=0)[0], rel=1e-5
    )


def test_predict_works_before_compile_and_restores_mode():
    model = fl.Sequential([nn.Linear(D, 4), nn.Dropout(0.5), nn.Linear(4, 2)])
    model.module.train()
    x, _ = data()
    a = model.predict(x)
    b = model.predict(x)
    assert np.array_equal(a, b), "predict runs in inference mode (dropout off)"
    assert model.module.training


# ================================================= the seeds' two-phase example


@pytest.fixture(scope="module")
def _lite0():
    return fl.models.pretrained("efficientnet_lite0", headless=True)


@pytest.mark.parametrize("second_compile", [True, False], ids=["as-written", "no-second-compile"])
def test_two_phase_example_with_and_without_the_second_compile(_lite0, second_compile):
    base = fl.wrap(copy.deepcopy(_lite0.module), name="base")
    base.trainable = True
    rng = np.random.default_rng(0)
    x = rng.random((4, 3, 32, 32), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 4)]
    # Phase 1
    for layer in base.layers:
        layer.trainable = False
    model = fl.Sequential([base, nn.Linear(1280, 3)])
    model.compile(
        optimizer=fl.optimizers.Adam(0.001), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    frozen = snap(base.weights)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert equal(frozen, base.weights)
    # Phase 2: unfreeze the last few leaf layers
    last = base.leaf_layers()[-3:]
    for leaf in last:
        leaf.trainable = True
    if second_compile:
        model.compile(
            optimizer=fl.optimizers.Adam(0.00001),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
    tuned = [p for leaf in last for p in leaf.module.parameters(recurse=False)]
    tuned_ids = {id(p) for p in tuned}
    rest = [p for p in base.module.parameters() if id(p) not in tuned_ids]
    before_tuned, before_rest = snap(tuned), snap(rest)
    history = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert set(history.history) >= {"loss", "accuracy"}
    assert moved(before_tuned, tuned), "the unfrozen layers train, recompiled or not"
    assert equal(before_rest, rest)
    expected_lr = 1e-5 if second_compile else 1e-3
    assert [g["lr"] for g in model.optimizer.param_groups] == pytest.approx(
        [expected_lr] * len(model.optimizer.param_groups)
    )
