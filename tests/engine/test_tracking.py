"""fl.track / OptimizerTracker: any torch optimizer follows the trainable set in a plain loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import frostline as fl
from frostline.engine.tracking import OptimizerTracker

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
    (torch.optim.Adagrad, {"lr": 0.1}),
    (torch.optim.NAdam, {"lr": 0.01}),
]


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
def test_any_optimizer_freezes_bitwise_keeps_state_and_trains_what_joins(cls, kw):
    model = net()
    opt = cls(model.parameters(), **kw)
    tracker = fl.track(opt, model)
    for i in range(3):
        step(model, opt, i)
    head_state = {
        k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[model[4].weight].items()
    }
    model[0].requires_grad_(False)  # freeze a layer that has momentum / moments
    frozen = model[0].weight.detach().clone()
    for i in range(3, 6):
        step(model, opt, i)
    assert torch.equal(model[0].weight, frozen)  # weight decay and momentum included
    assert model[0].weight not in opt.state and model[0].weight.grad is None
    assert all(model[0].weight is not p for g in opt.param_groups for p in g["params"])
    # the head kept its state: its step counter (or moments) went on from where it was
    if "step" in head_state:
        assert float(opt.state[model[4].weight]["step"]) == float(head_state["step"]) + 3
    # unfreezing with its own rate: a new group, fresh state, and it trains
    fl.wrap(model).unfreeze("0", learning_rate=1e-3)
    step(model, opt, 7)
    assert not torch.equal(model[0].weight, frozen)
    group = next(g for g in opt.param_groups if any(p is model[0].weight for p in g["params"]))
    assert group["lr"] == pytest.approx(1e-3) and group is not opt.param_groups[0]
    assert tracker.changes == 2


def test_newly_trainable_parameters_start_fresh_and_use_the_default_rate():
    model = net()
    model[0].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    fl.track(opt, model)
    step(model, opt)
    model[0].requires_grad_(True)
    step(model, opt, 1)
    assert float(opt.state[model[0].weight]["step"]) == 1
    assert float(opt.state[model[2].weight]["step"]) == 2
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02]


def test_an_own_rate_set_later_moves_the_parameter_with_its_state():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = fl.track(opt, model)
    step(model, opt)
    moment = opt.state[model[0].weight]["exp_avg"].clone()
    from frostline.core.state import set_learning_rate

    set_learning_rate(model[0].weight, 1e-4)
    assert tracker.sync()
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], moment)
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rates[id(model[0].weight)] == 1e-4 and rates[id(model[0].bias)] == 0.01


def test_without_the_hook_sync_is_explicit_and_remove_stops_it():
    model = net()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tracker = fl.track(opt, model, hook=False)
    model[0].requires_grad_(True)
    step(model, opt)
    assert len(opt.param_groups) == 1  # not synced yet
    assert tracker.sync() and len(opt.param_groups) == 2
    with fl.track(opt, model) as scoped:
        model[0].requires_grad_(False)
        step(model, opt)
        # groups that were there when tracking began are emptied, never removed
        assert [len(g["params"]) for g in opt.param_groups] == [4, 0] and scoped.changes == 1
    model[0].requires_grad_(True)
    step(model, opt)
    assert [len(g["params"]) for g in opt.param_groups] == [4, 0]  # the scoped hook is gone


def test_a_layout_restores_the_groups_so_a_saved_state_resumes_bitwise():
    def run(resume_at: int | None):
        model = net()
        model[0].requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        tracker = fl.track(opt, model)
        for i in range(6):
            if i == 2:
                fl.wrap(model).unfreeze("0", learning_rate=1e-3)
            if i == resume_at:
                layout, sd = tracker.layout(), opt.state_dict()
                weights = {k: v.clone() for k, v in model.state_dict().items()}
                model = net()
                model.load_state_dict(weights)
                opt = torch.optim.AdamW(  # as the script builds it at start
                    [p for n, p in model.named_parameters() if not n.startswith("0.")], lr=0.01
                )
                tracker = fl.track(opt, model)
                tracker.restore_layout(layout)
                opt.load_state_dict(sd)
            step(model, opt, i)
        return model

    a, b = run(None), run(4)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_parameters_that_are_not_the_modules_are_left_alone():
    model = net()
    temperature = nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    tracker = fl.track(opt, model)
    model[0].requires_grad_(False)
    assert tracker.sync()
    assert any(p is temperature for p in opt.param_groups[0]["params"])
    assert not any(p is model[0].weight for p in opt.param_groups[0]["params"])


def test_bad_inputs_say_what_was_given():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fl.track("adam", model)
    with pytest.raises(TypeError, match="nn.Module or a frostline"):
        fl.track(opt, "model")
    other = torch.optim.SGD(net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not drive this optimizer"):
        fl.track(opt, model, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))
    with pytest.raises(ValueError, match="finite number"):
        fl.track(opt, model, lr=float("nan"))
    tracker = OptimizerTracker(opt, model)
    with pytest.raises(ValueError, match="does not have"):
        tracker.restore_layout([{"names": ["9.weight"]}])
    with pytest.raises(ValueError, match="names"):
        tracker.restore_layout({"names": []})
    foreign = torch.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"shapes \[\(3,\)\]"):
        OptimizerTracker(foreign, model).layout()
