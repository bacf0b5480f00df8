"""ProgressiveFreezing on the model's own stages, by calendar or by a criterion."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import frostline as fl
from frostline import schedules
from frostline.core.leaves import leaf_entries
from frostline.workflows.schedules import layer_groups


def test_stages_come_from_the_model():
    lite = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    names = [g.name for g in layer_groups(lite, "stages")]
    assert names[0] == "conv_stem+bn1" and names[1:6] == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "blocks.4",
    ]
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    groups = layer_groups(vit, "stages")
    assert groups[0].paths[:2] == ("cls_token", "pos_embed")  # own weights join the stem
    assert [g.name for g in groups][1:3] == ["blocks.0", "blocks.1"]
    mobile = [g.name for g in layer_groups(torchvision.models.mobilenet_v2(), "stages")]
    assert mobile[:3] == ["features.0", "features.1", "features.2"] and mobile[-1] == "classifier"
    resnet = [g.name for g in layer_groups(torchvision.models.resnet18(), "stages")]
    assert resnet == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    bert = [g.name for g in layer_groups(BertForSequenceClassification(cfg), "stages")]
    assert bert == [
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.pooler",
        "classifier",
    ]
    every = {i for g in layer_groups(lite, "stages") for i in g.indices}
    assert every == set(range(len(leaf_entries(lite))))  # each leaf in one stage


def _regression(criterion: str, tolerance: float, epochs: int = 4, plateau: float | None = 0.1):
    torch.manual_seed(0)
    model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)))
    model.compile(fl.optimizers.SGD(0.01), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 1))).astype(np.float32)
    cb = schedules.ProgressiveFreezing(
        start_epoch=1, criterion=criterion, tolerance=tolerance, plateau=plateau
    )
    snaps = []

    class Snap(fl.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snaps.append(self.model.module[0].weight.detach().clone())

    # full batches: gradient descent on a convex loss slows down epoch after epoch
    model.fit(x, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0, callbacks=[cb, Snap()])
    return cb, snaps


@pytest.mark.parametrize("criterion", ["weight_change", "grad_norm"])
def test_a_criterion_freezes_a_stage_once_it_has_slowed_down(criterion):
    cb, snaps = _regression(criterion, tolerance=1.0)
    freezes = [(e["epoch"], e["groups"]) for e in cb.log if e["action"] == "freeze"]
    # measured in epochs 0 and 1, slower in 1: frozen at 2, as a run from the bottom
    assert freezes[0][0] == 2 and freezes[0][1][0] == "0"
    assert all(g != "2" for _, gs in freezes for g in gs)  # the top stays trainable
    ratios = [e["activity"] for e in cb.log if e["action"] == "epoch"]
    assert ratios[0] == {"0": 1.0, "1": 1.0, "2": 1.0} and ratios[1]["0"] < 1.0
    assert torch.equal(snaps[2], snaps[3])  # frozen from epoch 2 on, bitwise
    assert cb.get_state()["since"]["2"] == 2  # the top compares epochs from 2 on only
    # gradient descent here slows by a few percent an epoch: by the tolerance alone it is
    # still moving; the plateau rule (weight_change) counts that as having stopped falling
    strict, _ = _regression(criterion, tolerance=1e-6, plateau=None)
    assert [e for e in strict.log if e["action"] == "freeze"] == []  # still moving: not frozen


def _after(history: dict[str, list[float]], since: dict | None = None, **kwargs) -> int:
    """How many groups a weight_change schedule over three stages freezes, given each
    group's measured movement per epoch (its first epoch first)."""
    model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)))
    cb = schedules.ProgressiveFreezing(start_epoch=1, criterion="weight_change", **kwargs)
    cb.set_model(model)
    cb.set_state({"log": [], "history": history, "since": since or {}})
    return cb.target(epoch=len(history["0"]))


def test_weight_change_freezes_a_stage_whose_movement_has_levelled_off():
    # measured on a small pre-trained ViT (benchmarks/progressive.py): its stem's movement
    # flattens at about half of its first epoch's, its blocks' fall below 0.35
    stem = [1.0, 0.74, 0.63, 0.53, 0.50, 0.51]
    blocks = [1.0, 0.55, 0.41, 0.34, 0.31, 0.29]
    head = [1.0, 0.8, 0.65, 0.55, 0.48, 0.42]  # still falling by more than 10% an epoch
    history = {"0": stem, "1": blocks, "2": head}
    assert _after(history, plateau=None) == 0  # the tolerance alone: the stem blocks all
    assert _after(history) == 2  # the stem stopped falling, the blocks are below 0.35
    assert _after({**history, "0": stem[:-1]}) == 2  # 0.50 is within 10% of 0.53
    assert _after({**history, "0": stem[:4]}) == 0  # 0.53 is 16% below 0.63: still falling
    assert _after({**history, "0": stem[:-1] + [0.44]}) == 0  # 12% below 0.50
    assert _after({**history, "1": [1.0, 0.55, 0.41, 0.29, 0.30, 0.31]}) == 2  # level near 0.3
    assert _after({**history, "1": [1.0, 0.55, 0.41, 0.38, 0.44]}) == 1  # rising: disturbed
    assert _after({**history, "0": [1.0, 0.3]}) == 2  # below the tolerance at once
    assert _after({**history, "0": [1.0, 1.1]}) == 0  # no earlier epoch after the first yet
    # the tolerance still decides by itself: a stage falling steadily above it stays
    assert _after({**history, "1": [1.0, 0.8, 0.6, 0.5, 0.42]}) == 1
    assert _after({**history, "0": [1.0, 0.6, 0.59]}, plateau=0.0) == 0  # 0: never lower
    assert _after({**history, "0": [1.0, 0.6, 0.6]}, plateau=0.0) == 2


def test_after_a_freeze_below_only_the_epochs_since_count():
    # EfficientNet-Lite0 (benchmarks/progressive.py): its stem froze after epoch 2; blocks.0
    # moved 0.41 of its first epoch's in epochs 2 and 3: level, but only because the freeze
    # disturbed it (it moved 0.45, then 0.34 after)
    frozen_stem = [1.0, 0.53, 0.34]
    blocks = [1.0, 0.55, 0.41, 0.41]
    head = [1.0, 0.8, 0.65, 0.55]
    history = {"0": frozen_stem, "1": blocks, "2": head}
    assert _after(history, since={"1": 3, "2": 3}) == 1  # nothing to compare with since
    assert _after(history) == 2  # compared with epoch 2 (before the freeze): level
    assert _after({**history, "1": blocks + [0.44]}, since={"1": 3, "2": 3}) == 2  # level since


def test_the_criterion_history_survives_a_checkpoint():
    model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)))
    cb = schedules.ProgressiveFreezing(criterion="weight_change")
    cb.set_model(model)
    cb.set_state({"log": [], "history": {"0": [1.0, 0.6, 0.59]}})
    state = cb.get_state()
    assert state["history"] == {"0": [1.0, 0.6, 0.59]}
    again = schedules.ProgressiveFreezing(criterion="weight_change")
    again.set_model(model)
    again.set_state(state)
    assert again.target(3) == 1
    old = schedules.ProgressiveFreezing(criterion="weight_change")  # saved before the history
    old.set_model(model)
    old.set_state({"log": [], "first": {"0": 1.0}, "last": {"0": 0.3}})
    assert old.target(3) == 1


def test_criterion_and_tolerance_are_checked():
    with pytest.raises(ValueError, match="criterion must be one of .* got 'loss'"):
        schedules.ProgressiveFreezing(criterion="loss")
    with pytest.raises(ValueError, match=r"tolerance must be a number in \(0, 1\], got 2"):
        schedules.ProgressiveFreezing(criterion="grad_norm", tolerance=2)
    with pytest.raises(ValueError, match=r"plateau must be a number in \[0, 1\) or None, got 1"):
        schedules.ProgressiveFreezing(criterion="weight_change", plateau=1)


class _Block(nn.Module):
    """A stage whose trace bakes its training flag in (dropout inline, as timm's blocks)."""

    def __init__(self, n_in: int, n_out: int, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        self.p = p

    def forward(self, x):
        x = torch.relu(self.fc(x))
        return nn.functional.dropout(x, self.p, self.training) if self.p else x


def _stages_fit(cache: bool, seen: list[int], frozen_inference: bool = True):
    fl.seed_everything(0)
    p = 0.1 if frozen_inference else 0.0  # a frozen stage drops out only in train mode
    net = nn.Sequential(_Block(6, 16, p), _Block(16, 16, p), _Block(16, 16, p), nn.Linear(16, 3))
    net[0].fc.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    model = fl.wrap(net)
    model.compile(fl.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    y = rng.integers(0, 3, 96)
    cb = schedules.ProgressiveFreezing(start_epoch=1)
    rows = []

    class Rows(fl.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rows.append(sum(n for n in seen if n > 4))  # data; tracing probes 4 samples at most
            seen.clear()

    h = model.fit(
        x, y, batch_size=32, epochs=5, verbose=0, callbacks=[cb, Rows()],
        frozen_inference=frozen_inference, cache=cache,
    )  # fmt: skip
    notes = [e["cache"].split(" ")[0] for e in cb.log if e["action"] == "epoch"]
    return h.history["loss"], notes, rows


@pytest.mark.parametrize("frozen_inference", [True, False])
def test_each_freeze_extends_the_cache_below_the_new_boundary(frozen_inference):
    # frozen_inference puts each newly frozen stage in eval mode: the model is traced
    # again (the flag is baked in), and the cache still grows from the stored frontier
    losses, notes, rows = _stages_fit(True, [], frozen_inference)
    assert notes == ["off", "built", "extended", "extended", "reused"]
    # the first stage reads the 96 samples while it trains (epoch 0) and once more to
    # build the cache (epoch 1); extending runs stages 1 and 2 over the stored outputs
    assert rows == [96, 96, 0, 0, 0]
    plain, off, _ = _stages_fit(False, [], frozen_inference)
    assert off[1:] == ["off"] * 4
    assert losses == pytest.approx(plain, rel=1e-6)  # the same training as without a cache
