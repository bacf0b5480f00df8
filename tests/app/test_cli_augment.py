"""frostline fit --augment flip,rotate: Keras's random augmentation of the training images."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from frostline.app import cli, imagefolder

FACTORY = """
from torch import nn

def build(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes),
    )
"""


def _npz(tmp_path, monkeypatch):
    (tmp_path / "tiny_factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12) % 2)


def _fit(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_with_augment_trains_on_fresh_draws(tmp_path, capsys, monkeypatch):
    _npz(tmp_path, monkeypatch)
    out = tmp_path / "run"
    argv = ["fit", "d.npz", "--model", "tiny_factory:build", "--image-size", 8]
    argv += ["--epochs1", 2, "--augment", "flip,rotate", "--out", out]
    code, stdout, err = _fit(argv, capsys)
    assert code == 0, err
    assert "cache: off (data is not declared deterministic" in stdout  # never cached
    assert "cache: reused" not in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["augment"] == ["flip", "rotate"]
    assert "training images augmented: flip, rotate" in (out / "report.md").read_text()


def test_augment_rejects_unknown_kinds_and_float_inputs(tmp_path, capsys, monkeypatch):
    _npz(tmp_path, monkeypatch)
    code, _, err = _fit(["fit", "d.npz", "--augment", "flip,zoom"], capsys)
    assert code == 2 and "--augment: unknown augmentation 'zoom'; choose from flip, rotate" in err
    np.savez(tmp_path / "f.npz", x=np.zeros((12, 3, 8, 8), np.float32), y=np.arange(12) % 2)
    argv = ["fit", "f.npz", "--model", "tiny_factory:build", "--augment", "flip"]
    code, _, err = _fit([*argv, "--out", tmp_path / "r2"], capsys)
    assert code != 0 and "--augment flip needs images" in err


def test_augmented_dataset_draws_at_every_read_and_says_so():
    x = np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    plain = imagefolder.ImageArrayDataset(x, np.arange(4) % 2)
    aug = imagefolder.ImageArrayDataset(
        x, np.arange(4) % 2, augment=imagefolder.augmentation(["rotate"])
    )
    assert plain.deterministic and not aug.deterministic
    reads = [aug[0][0] for _ in range(3)]
    assert not torch.allclose(reads[0], reads[1]) and not torch.allclose(reads[1], reads[2])
    assert reads[0].shape == plain[0][0].shape
    with pytest.raises(imagefolder.InputError, match="unknown augmentation 'zoom'"):
        imagefolder.augmentation(["zoom"])


def test_cached_epochs_read_labels_without_touching_images():
    import frostline as fl

    x = np.random.default_rng(2).integers(0, 255, (24, 8, 8, 3), dtype=np.uint8)
    ds = imagefolder.ImageArrayDataset(x, np.arange(24) % 2)
    reads = []
    original, batch = ds.__class__.__getitem__, ds.__class__.__getitems__

    class Counting(imagefolder.ImageArrayDataset):
        def __getitem__(self, i):
            reads.append(i)
            return original(self, i)

        def __getitems__(self, indices):
            reads.extend(indices)
            return batch(self, indices)

    ds.__class__ = Counting
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2)
    )
    model = fl.wrap(net)
    model.layers[0].trainable = False
    model.compile("adam", loss="sparse_categorical_crossentropy")
    seen = []

    class Count(fl.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(len(reads))

    model.fit(ds, epochs=3, batch_size=8, verbose=0, callbacks=[Count()])
    assert model.cache_status["train"].state.value == "reused"
    # the build read each image once; the first reuse re-reads a few to verify the
    # declared-deterministic data, and the labels of every cached epoch cost no image
    assert seen[0] >= 24 and seen[1] - seen[0] <= 4 and seen[2] == seen[1]
