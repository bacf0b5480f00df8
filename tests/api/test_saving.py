"""Model files: safetensors + metadata, rebuild, trainable state, safe loading."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.io.errors import CheckpointError
from frostline.io.safetensors_io import load_safetensors


def small_model() -> fl.Sequential:
    torch.manual_seed(0)
    return fl.Sequential(
        [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)]
    )


def test_save_load_roundtrip_keeps_weights_and_trainable_state(tmp_path):
    m = small_model()
    m.layers[0].trainable = False
    m.get_layer("batch_norm2d").set_batchnorm_mode("inference")
    m.save(tmp_path / "m.safetensors")
    m2 = fl.load(tmp_path / "m.safetensors")
    assert [layer.name for layer in m2.layers] == [layer.name for layer in m.layers]
    for (k, a), (k2, b) in zip(m.module.state_dict().items(), m2.module.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert m2.layers[0].trainable is False
    assert [p.requires_grad for p in m2.module.parameters()] == [
        p.requires_grad for p in m.module.parameters()
    ]
    assert fl.batchnorm.mode_of(m2.get_layer("batch_norm2d").module) == "inference"
    x = torch.randn(2, 3, 8, 8)
    m.module.eval(), m2.module.eval()
    assert torch.equal(m(x), m2(x))


def test_metadata_is_json_and_nothing_is_pickled(tmp_path):
    m = small_model()
    m.save(tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert b"\x80\x04" not in raw[:64]  # no pickle protocol header
    _, header = load_safetensors(tmp_path / "m.safetensors")
    meta = json.loads(header["frostline_model"])
    assert meta["architecture"]["kind"] == "sequential"
    assert meta["frostline_version"] == fl.__version__


def test_zoo_model_rebuilds_by_name(tmp_path):
    base = fl.models.pretrained("efficientnet_lite0", headless=True)
    model = fl.Sequential([base, nn.Linear(1280, 5)])
    base.trainable = False
    model.save(tmp_path / "z.safetensors")
    again = fl.load(tmp_path / "z.safetensors")
    assert again.layers[0].class_name == "EfficientNet"
    assert len(again.trainable_weights) == 2
    x = torch.randn(1, 3, 64, 64)
    model.module.eval(), again.module.eval()
    torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)


def test_import_path_needs_trust(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg_fl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\ndef net(width=4):\n    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = fl.saving.build("mypkg_fl:net", width=5)
    m.save(tmp_path / "i.safetensors")
    with pytest.raises(CheckpointError, match="trusted_modules"):
        fl.load(tmp_path / "i.safetensors")
    loaded = fl.load(tmp_path / "i.safetensors", trusted_modules=["mypkg_fl"])
    assert loaded.count_params() == m.count_params() == 3 * 5 + 5
    sys.modules.pop("mypkg_fl", None)


def test_missing_import_path_is_a_clear_error(tmp_path, monkeypatch):
    pkg = tmp_path / "gone_pkg_fl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import torch\ndef net():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fl.saving.build("gone_pkg_fl:net").save(tmp_path / "g.safetensors")
    (pkg / "__init__.py").unlink()
    pkg.rmdir()
    sys.modules.pop("gone_pkg_fl", None)
    with pytest.raises(CheckpointError, match="cannot be imported"):
        fl.load(tmp_path / "g.safetensors", trusted_modules=["gone_pkg_fl"])


def test_custom_module_says_to_build_and_load_weights(tmp_path):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) * 2

    m = fl.wrap(Custom())
    m.save(tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="load_weights"):
        fl.load(tmp_path / "c.safetensors")
    other = fl.wrap(Custom())
    other.load_weights(tmp_path / "c.safetensors")
    assert torch.equal(other.module.lin.weight, m.module.lin.weight)


def test_loading_into_a_different_architecture_lists_keys(tmp_path):
    small_model().save(tmp_path / "m.safetensors")
    other = fl.Sequential([nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7)])
    with pytest.raises(CheckpointError) as e:
        other.load_weights(tmp_path / "m.safetensors")
    msg = str(e.value)
    assert "Missing keys: none" in msg and "Unexpected keys: batch_norm2d.bias" in msg
    assert (
        "batch_norm2d.weight" in msg
        and "Shape mismatches: linear.weight: file (3, 144) vs model (7, 144)" in msg
    )


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    m = small_model()
    path = tmp_path / "m.safetensors"
    m.save(path)
    before = path.read_bytes()
    import frostline.io.atomic as atomic

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with torch.no_grad():
        m.module[0].weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        m.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_model_checkpoint_callback_writes_best(tmp_path):
    m = small_model()
    m.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32)
    y = np.arange(16) % 3
    cb = fl.callbacks.ModelCheckpoint(
        tmp_path / "best-{epoch:02d}.safetensors", monitor="loss", save_best_only=True
    )
    m.fit(x, y, epochs=3, verbose=0, callbacks=[cb])
    assert cb.saved and all((tmp_path / p.split("/")[-1]).exists() for p in cb.saved)
    fl.load(cb.saved[-1])
    with pytest.raises(ValueError, match="safetensors"):
        fl.callbacks.ModelCheckpoint(tmp_path / "x.pt")
