"""frostline.integrations.lightning: the seeds' workflows inside a real lightning.Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import frostline as fl  # noqa: E402
from frostline.integrations.lightning import FreezeCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(pl.LightningModule):
    def __init__(self, opt: str = "sgd") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Linear(4, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 8),
            nn.ReLU(),
            nn.Linear(8, 8),
        )
        self.head = nn.Linear(8, 2)
        self.opt = opt

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.opt == "adamw":
            return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g)
    y = torch.randint(0, 2, (48,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=12, shuffle=False)


def trainer(tmp_path: Path, epochs: int, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **kw,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_unfreeze_at_an_epoch_trains_the_new_layers_and_keeps_the_frozen_ones_bitwise(tmp_path):
    net = Net()
    before = snapshot(net)
    cb = FreezeCallback(
        [fl.schedules.UnfreezeAt(2, "backbone.5", learning_rate=0.01)], freeze="backbone"
    )
    seen: list[list[tuple[int, float]]] = []

    class Groups(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append([(len(g["params"]), g["lr"]) for g in trainer.optimizers[0].param_groups])

    trainer(tmp_path, 3, [cb, Groups()]).fit(net, loader())
    after = snapshot(net)
    # the trainer's own optimizer got a new group at the selection's rate (no manual plumbing)
    assert seen == [[(2, 0.1)], [(2, 0.1)], [(2, 0.1), (2, 0.01)]]
    assert not torch.equal(after["backbone.5.weight"], before["backbone.5.weight"])
    assert not torch.equal(after["head.weight"], before["head.weight"])
    for k in ("backbone.0.weight", "backbone.3.weight", "backbone.1.weight"):
        assert torch.equal(after[k], before[k]), k
    # frozen BatchNorm ran on its running statistics although Lightning called .train()
    assert torch.equal(after["backbone.1.running_mean"], before["backbone.1.running_mean"])
    assert torch.equal(after["backbone.1.running_var"], before["backbone.1.running_var"])
    assert cb.report is not None and cb.report.ok and cb.report.exempt == 2


def test_gradual_unfreezing_with_discriminative_rates_lands_in_the_trainers_optimizer(tmp_path):
    net = Net()
    cb = FreezeCallback(
        [
            fl.schedules.DiscriminativeLR("backbone", 0.08, decay=0.5, groups=3),
            fl.schedules.GradualUnfreezing("backbone", groups=3, start_epoch=1),
        ]
    )
    trainer(tmp_path, 4, [cb]).fit(net, loader())
    opt = cb.tracker.optimizer
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(net.backbone[5].weight)] == pytest.approx(0.08)
    assert rate[id(net.backbone[3].weight)] == pytest.approx(0.04)
    assert rate[id(net.backbone[0].weight)] == pytest.approx(0.02)
    assert rate[id(net.head.weight)] == pytest.approx(0.1)
    log = cb.schedules[1].log
    assert [(e["epoch"], e["groups"]) for e in log] == [
        (1, ["leaves 3..3"]),
        (2, ["leaves 2..2"]),
        (3, ["leaves 0..1"]),
    ]


def test_unfrozen_layers_follow_the_lr_scheduler_of_configure_optimizers(tmp_path):
    class Scheduled(Net):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)]

    net = Scheduled()
    cb = FreezeCallback(
        [fl.schedules.UnfreezeAt(1, "backbone.5", learning_rate=0.02)], freeze="backbone"
    )
    trainer(tmp_path, 3, [cb]).fit(
        net, loader()
    )  # torch zips groups and scheduler entries strictly
    opt = cb.tracker.optimizer
    head, new = opt.param_groups
    assert new["lr"] / 0.02 == pytest.approx(head["lr"] / 0.1) == pytest.approx(0.125)
    assert new["initial_lr"] == 0.02


def test_a_frozen_weight_that_moves_is_reported(tmp_path):
    class Sneaky(Net):
        def training_step(self, batch, batch_idx):
            with torch.no_grad():
                self.backbone[0].weight.add_(1.0)  # a bug: writes into a frozen layer
            return super().training_step(batch, batch_idx)

    cb = FreezeCallback(freeze="backbone")
    with pytest.raises(fl.FrozenWeightsChanged, match=r"backbone\.0\.weight"):
        trainer(tmp_path, 1, [cb]).fit(Sneaky(), loader())


def test_resume_continues_with_the_trainable_state_it_stopped_with(tmp_path):
    def callback():
        return FreezeCallback(
            [
                fl.schedules.DiscriminativeLR("backbone", 0.04, decay=0.5, groups=3),
                fl.schedules.GradualUnfreezing("backbone", groups=3, start_epoch=1),
            ]
        )

    full = Net("adamw")
    trainer(tmp_path / "full", 4, [callback()]).fit(full, loader())

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "a", 3, [callback(), ckpt]).fit(Net("adamw"), loader())
    resumed = Net("adamw")
    cb = callback()
    trainer(tmp_path / "b", 4, [cb]).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert len(cb.tracker.optimizer.param_groups) == 4
    assert cb.report is not None and cb.report.ok


def test_bad_arguments_say_what_was_given():
    with pytest.raises(TypeError, match="frostline callbacks"):
        FreezeCallback(["backbone"])
    with pytest.raises(ValueError, match="optimizer_index"):
        FreezeCallback(optimizer_index=-1)
    with pytest.raises(ValueError, match="verify"):
        FreezeCallback(verify="sometimes")


@pytest.mark.slow
def test_ddp_two_processes_rebuild_when_the_trainable_set_changes(tmp_path):
    script = Path(__file__).parent / "dist_scripts" / "lightning_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}: gradients were not all-reduced"
    for r in results:
        assert r["rebuilds"] == 2  # unfreeze at epoch 1, freeze back at epoch 2
        assert r["verified"]
        assert r["unfrozen_moved"] and not r["frozen_moved"]


# --------------------------------------------------------------------------- group options


class Grouped(Net):
    """The user's own groups: decay for weights, none for biases and BatchNorm."""

    def configure_optimizers(self):
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return torch.optim.AdamW(
            [
                {"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": 0.05},
                {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0},
            ],
            lr=1e-3,
            betas=(0.8, 0.99),
        )


def options_of(opt: torch.optim.Optimizer, net: nn.Module) -> dict[str, tuple]:
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {
        n: (where[id(p)]["weight_decay"], where[id(p)]["betas"])
        for n, p in net.named_parameters()
        if id(p) in where
    }


def test_unfrozen_parameters_join_with_the_options_of_the_users_group(tmp_path):
    net = Grouped()
    cb = FreezeCallback([fl.schedules.UnfreezeAt(1, "backbone")], freeze="backbone")
    trainer(tmp_path, 2, [cb]).fit(net, loader())
    got = options_of(cb.tracker.optimizer, net)
    assert len(cb.tracker.optimizer.param_groups) == 4  # the user's two, then decay / no decay
    for name in ("backbone.0.weight", "backbone.3.weight", "backbone.5.weight"):
        assert got[name] == (0.05, (0.8, 0.99)), name  # not AdamW's default 0.01
    for name in ("backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "backbone.5.bias"):
        assert got[name] == (0.0, (0.8, 0.99)), name  # biases and BatchNorm: no decay


def test_group_options_overrides_the_rule(tmp_path):
    net = Grouped()
    cb = FreezeCallback(
        [fl.schedules.UnfreezeAt(1, "backbone")],
        freeze="backbone",
        group_options=lambda name, p: {"weight_decay": 0.3},
    )
    trainer(tmp_path, 2, [cb]).fit(net, loader())
    got = options_of(cb.tracker.optimizer, net)
    assert {got[n][0] for n in got if n.startswith("backbone")} == {0.3}
    assert got["head.weight"][0] == 0.05 and got["head.bias"][0] == 0.0  # the user's, untouched


# --------------------------------------------------------------------------- hand-frozen children


@pytest.mark.parametrize("keep", [False, True], ids=["keras-semantics", "keep_frozen"])
def test_unfreezing_a_parent_and_the_children_frozen_by_hand(tmp_path, keep):
    net = Net()
    net.backbone[3].requires_grad_(False)  # frozen by hand before fit
    before = snapshot(net)
    cb = FreezeCallback(
        [fl.schedules.UnfreezeAt(1, "backbone")], freeze="backbone", keep_frozen=keep
    )
    trainer(tmp_path, 2, [cb]).fit(net, loader())
    after = snapshot(net)
    assert not torch.equal(after["backbone.0.weight"], before["backbone.0.weight"])
    # Keras: trainable = True on a parent reaches every child; keep_frozen keeps the hand-frozen one
    assert torch.equal(after["backbone.3.weight"], before["backbone.3.weight"]) is keep
    assert net.backbone[3].weight.requires_grad is not keep
    assert cb.report is not None and cb.report.ok


# --------------------------------------------------------------------------- several optimizers


class TwoOptimizers(pl.LightningModule):
    """A GAN-like module: two parts, two optimizers, manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.disc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_d = self.optimizers()
        for opt in (opt_g, opt_d):
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self.disc(self.gen(x)), y))
            opt.step()

    def configure_optimizers(self):
        def trainable(m):
            return [p for p in m.parameters() if p.requires_grad]

        return [
            torch.optim.SGD(trainable(self.gen), lr=0.1),
            torch.optim.SGD(trainable(self.disc), lr=0.01),
        ]


def test_with_several_optimizers_each_part_joins_the_optimizer_it_is_routed_to(tmp_path):
    net = TwoOptimizers()
    cb = FreezeCallback(
        [fl.schedules.UnfreezeAt(1, "gen.0"), fl.schedules.UnfreezeAt(1, "disc.0")],
        freeze=["gen.0", "disc.0"],
        optimizer_index={"gen": 0, "disc": 1},
    )
    trainer(tmp_path, 2, [cb]).fit(net, loader())
    opt_g, opt_d = (t.optimizer for t in cb.driver.trackers)
    for name, p in net.named_parameters():
        in_g = any(p is q for g in opt_g.param_groups for q in g["params"])
        in_d = any(p is q for g in opt_d.param_groups for q in g["params"])
        assert (in_g, in_d) == ((True, False) if name.startswith("gen") else (False, True)), name
    rate = {id(p): g["lr"] for g in opt_d.param_groups for p in g["params"]}
    assert rate[id(net.disc[0].weight)] == 0.01  # the discriminator optimizer's own rate
    assert cb.report is not None and cb.report.ok


def test_with_several_optimizers_an_index_never_takes_another_optimizers_parameters(tmp_path):
    net = TwoOptimizers()
    cb = FreezeCallback([fl.schedules.UnfreezeAt(1, "gen.0")], freeze="gen.0")
    trainer(tmp_path, 2, [cb]).fit(net, loader())
    opt_g = cb.tracker.optimizer
    mine = {id(p) for g in opt_g.param_groups for p in g["params"]}
    assert mine == {id(p) for p in net.gen.parameters()}  # disc's stay with their optimizer
    with pytest.raises(ValueError, match="does not have"):
        trainer(tmp_path, 1, [FreezeCallback(optimizer_index={"generator": 0})]).fit(
            TwoOptimizers(), loader()
        )
    with pytest.raises(ValueError, match="module paths to optimizer indices"):
        FreezeCallback(optimizer_index={"gen": -1})


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bitwise_with_onecycle_and_plateau(tmp_path):
    script = Path(__file__).parent / "dist_scripts" / "lightning_resume.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for mode in ("full", "resume"):  # each in a process of its own
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), "onecycle,plateau", mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for sched, ratio in (("onecycle", 0.02 / 0.05), ("plateau", 0.02 / 0.01)):
        full, resumed = (torch.load(tmp_path / sched / f"{m}.pt") for m in ("full", "resume"))
        for k, v in full["weights"].items():
            assert torch.equal(resumed["weights"][k], v), f"{sched}: {k}"
        assert resumed["lrs"] == full["lrs"] and len(full["lrs"]) == 2
        head, new = full["lrs"]  # the layer unfrozen at 0.02: against OneCycle's peak 0.05
        assert new / head == pytest.approx(ratio), sched
