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
