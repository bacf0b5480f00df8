"""fl.schedules: freezing schedules as callbacks (UnfreezeAt, GradualUnfreezing,
DiscriminativeLR, ProgressiveFreezing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.workflows import schedules

pytestmark = pytest.mark.usefixtures("one_thread")


X = np.random.default_rng(0).random((64, 6), dtype=np.float32)
Y = np.random.default_rng(1).integers(0, 3, 64)


def _model():
    """base: three Linear blocks (groups '0', '2', '4'); head: one Linear."""
    base = fl.wrap(
        nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()
        ),
        name="base",
    )
    model = fl.Sequential([base, nn.Linear(8, 3)])
    model.compile(fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    return model, base


class Probe(fl.Callback):
    """Per epoch (at its first batch, after every schedule ran): the trainable leaf paths,
    and the learning rate of each trainable parameter in the optimizer."""

    def __init__(self):
        self.trainable: list[list[str]] = []
        self.lrs: list[dict[str, float]] = []
        self._first = False

    def on_epoch_begin(self, epoch, logs=None):
        self._first = True

    def on_train_batch_end(self, batch, logs=None):
        if not self._first:
            return
        self._first = False
        m = self.model
        self.trainable.append([lay.path for lay in m.leaf_layers() if lay.trainable])
        names = {id(p): n for n, p in m.module.named_parameters()}
        self.lrs.append(
            {names[id(p)]: g["lr"] for g in m.optimizer.param_groups for p in g["params"]}
        )


# --------------------------------------------------------------------------- groups


def test_layer_groups():
    base = fl.wrap(
        nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2)))
    )
    # a single-child wrapper is looked through
    assert [g.name for g in schedules.layer_groups(base)] == ["0.0", "0.2", "0.3"]
    assert [g.indices for g in schedules.layer_groups(base, 2)] == [(0, 1), (2,)]
    groups = schedules.layer_groups(base, [fl.select.first(2), "0.3"])
    assert [g.paths for g in groups] == [("0.0", "0.2"), ("0.3",)]
    with pytest.raises(ValueError, match="overlap"):
        schedules.layer_groups(base, [fl.select.first(2), fl.select.last(2)])
    with pytest.raises(fl.SelectionError, match="matched no leaf layer"):
        schedules.layer_groups(base, ["nope"])
    with pytest.raises(ValueError, match="between 1 and"):
        schedules.layer_groups(base, 4)
    with pytest.raises(TypeError, match="groups must be"):
        schedules.layer_groups(base, "0.0")


# --------------------------------------------------------------------------- UnfreezeAt


def test_unfreeze_at_with_its_own_rate():
    model, base = _model()
    base.trainable = False
    probe = Probe()
    cb = schedules.UnfreezeAt(2, fl.select.last(1), learning_rate=1e-4, layer=base)
    model.fit(X, Y, epochs=4, verbose=0, callbacks=[cb, probe])
    assert (
        probe.trainable[:2] == [["linear"], ["linear"]]
        and probe.trainable[2:] == [["base.4", "linear"]] * 2
    )
    assert probe.lrs[2] == {
        "base.4.weight": 1e-4,
        "base.4.bias": 1e-4,
        "linear.weight": 1e-2,
        "linear.bias": 1e-2,
    }
    assert cb.log == [
        {
            "epoch": 2,
            "action": "unfreeze",
            "selector": "last(1)",
            "layers": 1,
            "params": 72,
            "learning_rate": 1e-4,
            "trainable_params": 99,
        }
    ]
    json.dumps(cb.get_state())
    with pytest.raises(ValueError, match="epoch"):
        schedules.UnfreezeAt(-1, "x")
    with pytest.raises(ValueError, match="learning_rate"):
        schedules.UnfreezeAt(1, "x", learning_rate=-1)
    with pytest.raises(fl.SelectionError, match="matched no layer"):  # at fit start, not at epoch N
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[schedules.UnfreezeAt(5, "nope")])


# --------------------------------------------------------------------------- gradual unfreezing


def test_gradual_unfreezing_changes_the_trainable_set_on_schedule():
    model, base = _model()
    probe = Probe()
    cb = schedules.GradualUnfreezing(base, start_epoch=1, every=2)
    model.fit(X, Y, epochs=6, verbose=0, callbacks=[cb, probe])
    assert probe.trainable == [
        ["linear"],  # epoch 0: head only (the base was frozen when training began)
        ["base.4", "linear"],  # epoch 1: top block joins
        ["base.4", "linear"],
        ["base.2", "base.4", "linear"],  # epoch 3: the next one down
        ["base.2", "base.4", "linear"],
        ["base.0", "base.2", "base.4", "linear"],  # epoch 5: all
    ]
    assert [(e["epoch"], e["groups"]) for e in cb.log] == [(1, ["4"]), (3, ["2"]), (5, ["0"])]
    assert [e["trainable_params"] for e in cb.log] == [99, 171, 227]
    # weights frozen at the start and unfrozen later are exempt from the final check, the rest verified
    assert model.last_verification.ok
    state = json.loads(json.dumps(cb.get_state()))
    assert state["unfrozen"] == 3 and len(state["log"]) == 3
    # a group that never joins is verified bitwise at the end of the fit
    model, base = _model()
    model.fit(X, Y, epochs=2, verbose=0, callbacks=[schedules.GradualUnfreezing(base)])
    report = model.last_verification
    assert report.ok and report.checked == 2  # base.0 weight and bias


def test_gradual_unfreezing_resumes_by_epoch_and_by_name():
    model, base = _model()
    probe = Probe()
    cb = schedules.GradualUnfreezing("base", groups=3, learning_rate=1e-3)
    model.fit(X, Y, epochs=3, initial_epoch=1, verbose=0, callbacks=[cb, probe])
    # a fit that starts at epoch 1 lands where an uninterrupted one would be
    assert probe.trainable == [
        ["base.2", "base.4", "linear"],
        ["base.0", "base.2", "base.4", "linear"],
    ]
    assert probe.lrs[1]["base.0.weight"] == 1e-3 and probe.lrs[1]["linear.weight"] == 1e-2
    assert [e["groups"] for e in cb.log] == [["leaves 2..2", "leaves 1..1"], ["leaves 0..0"]]
    with pytest.raises(ValueError, match="not part of the model"):
        model.fit(X, Y, verbose=0, callbacks=[schedules.GradualUnfreezing(nn.Linear(2, 2))])
    with pytest.raises(ValueError, match="every"):
        schedules.GradualUnfreezing(base, every=0)
    with pytest.raises(ValueError, match="groups"):
        schedules.GradualUnfreezing(base, groups=0)


# --------------------------------------------------------------------------- discriminative rates


def test_discriminative_rates_land_in_the_optimizer_param_groups():
    model, base = _model()
    model.fit(X, Y, epochs=1, batch_size=16, verbose=0)  # optimizer state exists already
    opt = model.optimizer
    steps_before = opt.iterations
    momentum = opt.state[base.module[0].weight]["momentum"]
    cb = schedules.DiscriminativeLR(base, 1e-3, decay=0.1)
    probe = Probe()
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[cb, probe])
    expected = {
        "base.0": 1e-5,
        "base.2": 1e-4,
        "base.4": 1e-3,
        "linear": 1e-2,
    }  # layer-wise decay from the top; head keeps the compile rate
    for lrs in probe.lrs:
        for name, lr in lrs.items():
            assert lr == pytest.approx(expected[name.rsplit(".", 1)[0]]), name
    groups = model.optimizer.param_groups
    assert model.optimizer is opt and sorted(g["lr"] for g in groups) == pytest.approx(
        [1e-5, 1e-4, 1e-3, 1e-2]
    )
    assert opt.iterations == steps_before + 8
    assert opt.state[base.module[0].weight]["momentum"] is momentum  # regrouped, state kept
    assert cb.rates == {
        "0": pytest.approx(1e-5),
        "2": pytest.approx(1e-4),
        "4": pytest.approx(1e-3),
    }
    # a schedule on the headline rate keeps the ratios
    model.learning_rate = 5e-3
    assert sorted(g["lr"] for g in model.optimizer.param_groups) == pytest.approx(
        [5e-6, 5e-5, 5e-4, 5e-3]
    )
    json.dumps(cb.get_state())


def test_discriminative_lr_range_with_gradual_unfreezing():
    model, base = _model()
    probe = Probe()
    rates = schedules.DiscriminativeLR(base, lr_range=(1e-4, 1e-2))
    model.fit(
        X, Y, epochs=3, verbose=0, callbacks=[rates, schedules.GradualUnfreezing(base), probe]
    )
    assert rates.rates == {
        "0": pytest.approx(1e-4),
        "2": pytest.approx(1e-3),
        "4": pytest.approx(1e-2),
    }
    # each group joins the optimizer at its own rate when it is unfrozen
    assert probe.lrs[0] == {
        "base.4.weight": pytest.approx(1e-2),
        "base.4.bias": pytest.approx(1e-2),
        "linear.weight": 1e-2,
        "linear.bias": 1e-2,
    }
    assert probe.lrs[2]["base.0.weight"] == pytest.approx(1e-4) and probe.lrs[2][
        "base.2.bias"
    ] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="not both"):
        schedules.DiscriminativeLR(base, 1e-3, lr_range=(1e-4, 1e-3))
    with pytest.raises(ValueError, match="lo <= hi"):
        schedules.DiscriminativeLR(base, lr_range=(1e-2, 1e-4))
    with pytest.raises(ValueError, match="decay"):
        schedules.DiscriminativeLR(base, 1e-3, decay=1.5)


# --------------------------------------------------------------------------- progressive freezing


def test_progressive_freezing_freezes_from_the_bottom_and_caches_the_prefix(capsys):
    fl.seed_everything(0)
    model = fl.wrap(
        nn.Sequential(
            nn.Linear(6, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )
    )
    model.compile("adam", loss="sparse_categorical_crossentropy")
    snaps = {}

    class Snap(fl.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                snaps["0"] = self.model.module[0].weight.detach().clone()

    probe = Probe()
    cb = schedules.ProgressiveFreezing(start_epoch=1, every=1)
    model.fit(X, Y, epochs=5, verbose=2, callbacks=[cb, Snap(), probe])
    assert probe.trainable == [["0", "2", "4", "6"], ["2", "4", "6"], ["4", "6"], ["6"], ["6"]]
    assert [(e["epoch"], e["groups"]) for e in cb.log if e["action"] == "freeze"] == [
        (1, ["0"]),
        (2, ["2"]),
        (3, ["4"]),
    ]
    assert [e["epoch"] for e in cb.log if e["action"] == "stop"] == [
        4
    ]  # the last group stays trainable
    assert torch.equal(model.module[0].weight, snaps["0"])  # frozen from epoch 1 on, bitwise
    # the frozen prefix runs without autograd and is cached: the fit log's cache note changes
    notes = [e["cache"].split(" ")[0] for e in cb.log if e["action"] == "epoch"]
    assert notes == ["off", "built", "extended", "extended", "reused"]
    out = capsys.readouterr().out.splitlines()
    assert (
        "cache: off (no frozen part" in out[0]
        and "cache: built" in out[1]
        and "cache: reused" in out[4]
    )
    json.dumps(cb.get_state())


def test_progressive_freezing_max_groups_and_errors():
    model, base = _model()
    cb = schedules.ProgressiveFreezing(base, start_epoch=0, every=2, max_groups=1)
    model.fit(X, Y, epochs=4, verbose=0, callbacks=[cb])
    assert [lay.trainable for lay in base.leaf_layers()] == [False, True, True]
    assert [e["groups"] for e in cb.log if e["action"] == "freeze"] == [["0"]]
    with pytest.raises(ValueError, match="start_epoch"):
        schedules.ProgressiveFreezing(start_epoch=-1)
    with pytest.raises(TypeError, match="base"):
        schedules.ProgressiveFreezing(base=3)


# --------------------------------------------------------------------------- the model's own stages


def _stage_models():
    import timm
    import torchvision
    import transformers

    bert = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
    )
    gpt2 = transformers.GPT2Config(
        vocab_size=99,
        n_positions=16,
        n_embd=32,
        n_layer=3,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return {
        # name: (module, the stage modules; each must be a group of its own)
        "timm efficientnet_lite0": (
            fl.models.pretrained("efficientnet_lite0").module,
            [f"blocks.{i}" for i in range(7)],
        ),
        "timm resnet18": (timm.create_model("resnet18"), [f"layer{i}" for i in range(1, 5)]),
        "torchvision resnet18": (torchvision.models.resnet18(), [f"layer{i}" for i in range(1, 5)]),
        "torchvision efficientnet_b0": (
            torchvision.models.efficientnet_b0(),
            [f"features.{i}" for i in range(1, 8)],
        ),
        "torchvision mobilenet_v3_small": (
            torchvision.models.mobilenet_v3_small(),
            [f"features.{i}" for i in range(1, 12)],
        ),
        "hf bert": (
            transformers.BertForSequenceClassification(bert),
            [f"bert.encoder.layer.{i}" for i in range(3)],
        ),
        "hf gpt2": (transformers.GPT2LMHeadModel(gpt2), [f"transformer.h.{i}" for i in range(3)]),
    }


def test_default_groups_are_the_models_own_stages():
    for name, (module, stages) in _stage_models().items():
        groups = schedules.layer_groups(module)

        def stage_of(path: str, stages: list[str] = stages) -> str | None:
            return next((s for s in stages if path == s or path.startswith(s + ".")), None)

        for g in groups:  # no group holds more than one stage
            held = {stage_of(p) for p in g.paths} - {None}
            assert len(held) <= 1, f"{name}: group {g.name!r} holds stages {sorted(held)}"
        homes = {
            s: {i for i, g in enumerate(groups) for p in g.paths if stage_of(p) == s}
            for s in stages
        }
        for s, home in homes.items():  # and no stage is split across groups
            assert len(home) == 1, f"{name}: stage {s} is spread over groups {sorted(home)}"
        assert len({min(h) for h in homes.values()}) == len(stages)  # one group per stage


def test_discriminative_rates_on_efficientnet_lite0_give_each_stage_its_rate():
    """The issue's case: the seven blocks stages were one group (85% of the base)."""
    base = fl.models.pretrained("efficientnet_lite0")
    cb = schedules.DiscriminativeLR(base, base_lr=1e-3, decay=0.5)
    table = cb.dry_run(base)
    names = [r["group"] for r in table]
    assert names == [
        "conv_stem+bn1",
        *[f"blocks.{i}" for i in range(6)],
        "blocks.6+conv_head+bn2",
        "classifier",
    ]
    rates = [r["learning_rate"] for r in table]
    assert rates == pytest.approx([1e-3 * 0.5 ** (8 - i) for i in range(9)])
    assert "blocks.3" in str(table) and "learning rate" in str(table).splitlines()[0]
