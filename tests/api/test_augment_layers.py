"""fl.layers.RandomFlip / RandomRotation: Keras's semantics and clear errors."""

from __future__ import annotations

import pytest
import torch

import frostline as fl


def test_flip_modes_draw_each_axis_per_sample():
    x = torch.arange(4.0).reshape(1, 1, 2, 2).expand(256, 1, 2, 2)
    seen = {tuple(r.flatten().tolist()) for r in fl.layers.RandomFlip()(x)}
    assert seen == {
        (0.0, 1.0, 2.0, 3.0),
        (1.0, 0.0, 3.0, 2.0),
        (2.0, 3.0, 0.0, 1.0),
        (3.0, 2.0, 1.0, 0.0),
    }
    seen = {tuple(r.flatten().tolist()) for r in fl.layers.RandomFlip("vertical")(x)}
    assert seen == {(0.0, 1.0, 2.0, 3.0), (2.0, 3.0, 0.0, 1.0)}


def test_layers_follow_their_generator_and_are_identity_in_eval_mode():
    x = torch.randn(16, 3, 10, 14)
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(4)
        aug = torch.nn.Sequential(
            fl.layers.RandomFlip(generator=g), fl.layers.RandomRotation(0.2, generator=g)
        )
        outs.append(aug(x))
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == x.shape
    assert not torch.allclose(outs[0], x)
    assert torch.equal(aug.eval()(x), x)


def test_rotation_by_zero_is_the_identity_and_factor_ranges_are_checked():
    x = torch.randn(4, 3, 6, 9)
    torch.testing.assert_close(fl.layers.RandomRotation((0.0, 0.0))(x), x)
    with pytest.raises(ValueError, match=r"factor must be .* got \(0.3, 0.1\)"):
        fl.layers.RandomRotation((0.3, 0.1))
    with pytest.raises(ValueError, match="fill_mode must be one of .* got 'wrap'"):
        fl.layers.RandomRotation(0.1, fill_mode="wrap")
    with pytest.raises(ValueError, match="mode must be one of .* got 'diagonal'"):
        fl.layers.RandomFlip("diagonal")


def test_a_batch_that_is_not_float_images_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"got shape \(2, 5\) torch.float32"):
        fl.layers.RandomFlip()(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4, 4\) torch.uint8"):
        fl.layers.RandomRotation(0.1)(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
