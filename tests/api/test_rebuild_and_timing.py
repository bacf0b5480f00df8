"""Saving records how to rebuild timm and torchvision models; printed epoch times are whole."""

from __future__ import annotations

import contextlib
import io
import re
import time

import numpy as np
import pytest
import torch
import torchvision
from tiny_models import convnext, vit
from torch import nn
from torch.utils.data import Dataset

import frostline as fl


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "factory",
    [
        vit,
        lambda: __import__("timm").create_model("convnext_atto", num_classes=3),
        lambda: torchvision.models.resnet18(weights=None, num_classes=7),
        lambda: torchvision.models.mobilenet_v3_small(weights=None),
    ],
    ids=["timm-vit", "timm-convnext", "tv-resnet18", "tv-mobilenet"],
)
def test_load_rebuilds_timm_and_torchvision(tmp_path, factory):
    torch.manual_seed(0)
    model = fl.wrap(factory())
    model.freeze(fl.select.first(4))
    path = tmp_path / "m.safetensors"
    model.save(path)
    back = fl.load(path)
    assert type(back.module) is type(model.module)
    assert same_state(back.module, model.module)
    assert [p.requires_grad for p in back.module.parameters()] == [
        p.requires_grad for p in model.module.parameters()
    ]


def test_sequential_around_a_timm_model_rebuilds(tmp_path):
    import timm

    model = fl.Sequential([fl.wrap(timm.create_model("resnet10t", num_classes=6)), nn.Linear(6, 2)])
    model.save(tmp_path / "s.safetensors")
    back = fl.load(tmp_path / "s.safetensors")
    assert [layer.class_name for layer in back.layers] == ["ResNet", "Linear"]
    assert same_state(back.module, model.module)


def test_head_replaced_torchvision_model_rebuilds(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Linear(512, 4)
    model = fl.wrap(net)
    model.save(tmp_path / "r.safetensors")
    back = fl.load(tmp_path / "r.safetensors")
    assert back.module.fc.out_features == 4 and same_state(back.module, net)


def test_unrecoverable_timm_arguments_name_the_call(tmp_path):
    model = fl.wrap(convnext())  # custom dims: not recoverable from the module
    model.save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError) as e:
        fl.load(tmp_path / "c.safetensors")
    msg = str(e.value)
    assert "timm.create_model('convnext_atto'" in msg
    assert "model.load_weights(" in msg and "c.safetensors" in msg
    assert "custom module" not in msg


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


def test_custom_module_error_names_its_class(tmp_path):
    model = fl.wrap(Custom())
    model.save(tmp_path / "x.safetensors")
    with pytest.raises(ValueError) as e:
        fl.load(tmp_path / "x.safetensors")
    msg = str(e.value)
    assert f"{Custom.__module__}.Custom(" in msg and "model.load_weights(" in msg


class SlowSamples(Dataset):
    """Deterministic (so its frozen prefix is cached) but slow to read."""

    deterministic = True

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.x = torch.tensor(rng.normal(size=(48, 6)), dtype=torch.float32)
        self.y = torch.tensor(rng.integers(0, 2, 48))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        time.sleep(0.004)
        return self.x[i], self.y[i]


def test_printed_epoch_time_is_the_recorded_one():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    model = fl.Sequential([fl.wrap(base, name="base"), nn.Linear(16, 2)])
    model.get_layer("base").trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        hist = model.fit(SlowSamples(), epochs=2, batch_size=16, verbose=2)
    printed = [float(t) for t in re.findall(r"Epoch \d/2 - ([\d.]+)s", out.getvalue())]
    recorded = hist.history["epoch_time"]
    assert "cache: built" in out.getvalue() or "cache" in out.getvalue()
    assert printed == [float(f"{t:.2f}") for t in recorded]
