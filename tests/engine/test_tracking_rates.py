"""Learning rates stay right across (un)freezes: every torch LR scheduler, Keras-style
schedules and a GradScaler, with an optimizer tracked by fl.track."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import frostline as fl

pytestmark = pytest.mark.usefixtures("one_thread")

REF = 0.1  # the first group's rate in its schedule's terms (initial_lr, or max_lr for the peaked ones)
STEPS, UNFREEZE = 10, 3

# name -> make(optimizer, per-group nominal rates); with one rate per group the scheduler
# treats them as torch does for groups that were there from the start
Make = Callable[[torch.optim.Optimizer, list[float]], object]
SCHEDULERS: dict[str, Make] = {
    "LambdaLR": lambda o, r: S.LambdaLR(o, lambda s: 1 / (1 + s)),
    "MultiplicativeLR": lambda o, r: S.MultiplicativeLR(o, lambda s: 0.9),
    "StepLR": lambda o, r: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o, r: S.MultiStepLR(o, milestones=[2, 5], gamma=0.5),
    "ConstantLR": lambda o, r: S.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o, r: S.LinearLR(o, start_factor=0.25, total_iters=6),
    "ExponentialLR": lambda o, r: S.ExponentialLR(o, gamma=0.8),
    "PolynomialLR": lambda o, r: S.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o, r: S.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingLR-eta_min": lambda o, r: S.CosineAnnealingLR(o, T_max=6, eta_min=0.005),
    "CosineAnnealingWarmRestarts": lambda o, r: S.CosineAnnealingWarmRestarts(
        o, T_0=4, eta_min=0.001
    ),
    "CyclicLR": lambda o, r: S.CyclicLR(
        o, base_lr=[x / 10 for x in r], max_lr=list(r), step_size_up=3
    ),
    "OneCycleLR": lambda o, r: S.OneCycleLR(o, max_lr=list(r), total_steps=12),
    "ReduceLROnPlateau": lambda o, r: S.ReduceLROnPlateau(o, factor=0.5, patience=0, min_lr=0.001),
    "ReduceLROnPlateau-list": lambda o, r: S.ReduceLROnPlateau(
        o, factor=0.5, patience=0, min_lr=[0.001] * len(r)
    ),
    "SequentialLR": lambda o, r: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.5, total_iters=2), S.ExponentialLR(o, 0.9)], [5]
    ),
    "ChainedScheduler": lambda o, r: S.ChainedScheduler(
        [S.ConstantLR(o, factor=0.5, total_iters=4), S.ExponentialLR(o, gamma=0.9)]
    ),
}


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def sched_step(sched) -> None:
    if isinstance(sched, S.ReduceLROnPlateau):
        sched.step(1.0)  # a flat loss: the rate is cut at every step, down to its floor
    else:
        sched.step()


def reference(name: str, rates: list[float]) -> list[list[float]]:
    """Each group's rate at every optimizer step, for groups that were there from the start."""
    params = [nn.Parameter(torch.zeros(1)) for _ in rates]
    opt = torch.optim.SGD(
        [{"params": [p], "lr": r} for p, r in zip(params, rates)], lr=REF, momentum=0.9
    )
    sched = SCHEDULERS[name](opt, rates)
    out = []
    for _ in range(STEPS):
        opt.step()
        out.append([float(g["lr"]) for g in opt.param_groups])
        sched_step(sched)
    return out


@pytest.mark.parametrize("requested", [0.02, None], ids=["requested-0.02", "default"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_an_unfrozen_group_follows_every_torch_scheduler_at_its_own_rate(name, requested):
    model = net()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=REF, momentum=0.9)
    sched = SCHEDULERS[name](opt, [REF])
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from torch or frostline
        tracker = fl.track(opt, model, scheduler=sched)
        for i in range(STEPS):
            if i == UNFREEZE:
                fl.wrap(model).unfreeze("0", learning_rate=requested)
            step(model, opt, i)  # the tracker syncs when the forward pass begins
            assert len(sched.get_last_lr()) == len(opt.param_groups)
            seen.append([float(g["lr"]) for g in opt.param_groups])
            sched_step(sched)
            assert len(sched.get_last_lr()) == len(opt.param_groups)
    assert tracker.changes == 1 and len(opt.param_groups) == 2
    # the new group's rate is what the scheduler gives a group whose rate in its terms
    # is the requested one (the first group's without a request), had it been there from the start
    rate = REF if requested is None else requested
    expected = reference(name, [REF, rate])
    assert [s[0] for s in seen] == pytest.approx([e[0] for e in expected], rel=1e-9)
    assert [s[1] for s in seen[UNFREEZE:]] == pytest.approx(
        [e[1] for e in expected[UNFREEZE:]], rel=1e-9
    )
    if name in ("CosineAnnealingLR-eta_min", "CosineAnnealingWarmRestarts") or "Plateau" in name:
        return  # floors are absolute: the ratio holds above them only
    for s in seen[UNFREEZE:]:  # the ratio the docs promise: requested / first rate x first curve
        assert s[1] == pytest.approx(rate / REF * s[0], rel=1e-9)


def test_one_cycle_peaks_at_the_requested_rate_not_25_times_the_head():
    """The issue's case: the new group's rate came from initial_lr = max_lr / div_factor."""
    model = net()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sched = S.OneCycleLR(opt, max_lr=0.01, total_steps=40)
    fl.track(opt, model, scheduler=sched)
    fl.wrap(model).unfreeze("0", learning_rate=1e-3)
    peaks = [0.0, 0.0]
    for i in range(40):
        step(model, opt, i)
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, opt.param_groups)]
        sched.step()
    assert peaks[0] == pytest.approx(0.01, rel=1e-3)
    assert peaks[1] == pytest.approx(1e-3, rel=1e-3)  # was 0.25 before


def test_a_scheduler_state_saved_with_added_groups_loads_into_a_resumed_run():
    def build():
        model = net()
        model[0].requires_grad_(False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=REF)
        sched = S.ReduceLROnPlateau(opt, patience=0, min_lr=[0.001])
        return model, opt, sched, fl.track(opt, model, scheduler=sched)

    model, opt, sched, tracker = build()
    step(model, opt, 0)
    sched.step(1.0)
    fl.wrap(model).unfreeze("0", learning_rate=0.02)
    step(model, opt, 1)
    sched.step(1.0)
    layout, osd, ssd = tracker.layout(), opt.state_dict(), sched.state_dict()
    model2, opt2, sched2, tracker2 = build()
    model2[0].requires_grad_(True)  # the trainable state the run stopped with
    tracker2.restore_layout(layout)
    opt2.load_state_dict(osd)
    sched2.load_state_dict(ssd)
    for i in range(2, 5):
        for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
            step(m, o, i)
            s.step(1.0)
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert sched2.min_lrs == [0.001, 0.001]


# --------------------------------------------------------------------------- Keras-style schedules


def test_keras_style_schedules_scale_an_unfrozen_group_by_its_rate_in_fit():
    import numpy as np

    schedule = fl.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
    model = fl.wrap(net())
    model.layers[0].trainable = False
    model.compile(fl.optimizers.SGD(schedule), loss="sparse_categorical_crossentropy")
    rates: list[list[float]] = []

    class Rates(fl.Callback):
        def on_train_batch_end(self, batch, logs=None):
            opt = self.model.optimizer
            rates.append([opt.rate(g) for g in opt.param_groups])

    x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 2, 32)
    cb = fl.schedules.UnfreezeAt(1, "0", learning_rate=0.002)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cb, Rates()])
    joined = [r for r in rates if len(r) == 2]
    assert len(joined) == 8
    for first, new in joined:  # requested / nominal x the schedule, at every step
        assert new == pytest.approx(0.002 / 0.01 * first, rel=1e-9)
    assert joined[-1][0] < joined[0][0]  # and the schedule did decay


def test_keras_style_schedules_scale_an_unfrozen_group_under_fl_track():
    schedule = fl.optimizers.schedules.CosineDecay(0.05, decay_steps=10)
    model = net()
    model[0].requires_grad_(False)
    opt = fl.optimizers.Adam(schedule).build(
        [{"params": [p for p in model.parameters() if p.requires_grad]}]
    )
    fl.track(opt, model)
    fl.wrap(model).unfreeze("0", learning_rate=0.01)
    for i in range(5):
        step(model, opt, i)
        first, new = (opt.rate(g) for g in opt.param_groups)
        assert new == pytest.approx(0.01 / 0.05 * first, rel=1e-9)


# --------------------------------------------------------------------------- GradScaler


def scaled_step(model, opt, scaler, dtype, *, through_root: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        # through_root=False calls the layers one by one: the tracked module's forward never runs
        out = model(x) if through_root else model[1:](model[0](x))
        loss = nn.functional.cross_entropy(out.float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def unscaled_update(dtype) -> torch.Tensor:
    """What one SGD step at lr 0.01 does to the first layer, gradients unscaled."""
    model = net()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    with torch.autocast("cpu", dtype=dtype):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return -0.01 * model[0].weight.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("through_root", [True, False], ids=["forward-syncs", "scaler-given"])
def test_a_grad_scaler_never_gives_an_unfrozen_layer_a_scaled_update(dtype, through_root):
    model = net()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    fl.track(opt, model, **({} if through_root else {"scaler": scaler}))
    before = model[0].weight.detach().clone()
    fl.wrap(model).unfreeze("0")  # and no tracker.sync(): the tracker takes care of it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_step(model, opt, scaler, dtype, through_root=through_root)
    update = model[0].weight.detach() - before
    expected = unscaled_update(dtype)
    assert float(update.norm()) < 1.0  # a scaled gradient moves it by ~2**16 times more
    assert torch.allclose(update, expected, rtol=0.05, atol=1e-5)


def test_a_late_join_under_an_unknown_scaler_is_not_silent():
    model = net()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    fl.track(opt, model)
    fl.wrap(model).unfreeze("0")
    with pytest.warns(RuntimeWarning, match="pass scaler= to fl.track"):
        scaled_step(model, opt, scaler, torch.bfloat16, through_root=False)
    with pytest.raises(TypeError, match="GradScaler"):
        fl.track(opt, model, scaler="fp16")


# --------------------------------------------------------------------------- fit's own scheduler


@pytest.mark.parametrize(
    "factory",
    [
        lambda o: S.OneCycleLR(o, max_lr=0.01, total_steps=16, cycle_momentum=False),
        lambda o: S.CyclicLR(o, base_lr=0.001, max_lr=0.01, step_size_up=3, cycle_momentum=False),
        lambda o: S.LambdaLR(o, lambda s: 1 / (1 + s)),
    ],
    ids=["OneCycleLR", "CyclicLR", "LambdaLR"],
)
def test_fit_with_a_torch_scheduler_keeps_an_unfrozen_layers_own_rate(factory):
    """compile(scheduler=...) rebuilds the scheduler when groups change; a OneCycleLR or
    CyclicLR given one max_lr gave every group the same curve, own rates erased."""
    import numpy as np

    model = fl.wrap(net())
    model.layers[0].trainable = False
    model.compile(
        fl.optimizers.SGD(0.01),
        loss="sparse_categorical_crossentropy",
        scheduler=factory,
        scheduler_interval="step",
    )
    rates: list[list[float]] = []

    class Rates(fl.Callback):
        def on_train_batch_end(self, batch, logs=None):
            rates.append([g["lr"] for g in self.model.optimizer.param_groups])

    x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 2, 32)
    cb = fl.freezing.UnfreezeAt(1, "0", learning_rate=1e-3)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[cb, Rates()])
    joined = [r for r in rates if len(r) == 2]
    assert len(joined) == 8
    for head, new in joined:  # a tenth of the compile rate: a tenth of the curve
        assert new == pytest.approx(0.1 * head, rel=1e-9)


def test_fit_refuses_torchs_plateau_scheduler_with_the_fix():
    import numpy as np

    model = fl.wrap(net())
    model.compile(
        "sgd",
        loss="sparse_categorical_crossentropy",
        scheduler=lambda o: S.ReduceLROnPlateau(o),
    )
    with pytest.raises(TypeError, match=r"fl.callbacks.ReduceLROnPlateau"):
        model.fit(np.zeros((4, 4), np.float32), np.zeros(4, np.int64), verbose=0)
