"""LoRA parity with real Keras 3 (TensorFlow backend): counts, outputs and training steps.

Keras' ``enable_lora`` on Dense, Conv1D/Conv2D and Embedding: the kernel becomes
non-trainable, ``lora_kernel_a``/``lora_kernel_b`` (an Embedding's ``lora_embeddings_*``)
train, and the layer computes with ``kernel + a @ b * (lora_alpha / rank)``. frostline's
adapters have Keras' shapes, so Keras' values copy across as they are.
"""

from __future__ import annotations

import contextlib
import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import frostline as fl  # noqa: E402

with contextlib.suppress(Exception):  # import triton before TensorFlow (see test_keras_parity)
    import torch._dynamo  # noqa: E402, F401

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.keras
L = keras.layers


def _counts_keras(model) -> tuple[int, int, int]:
    def n(ws):
        return int(sum(np.prod(w.shape) for w in ws))

    return n(model.weights), n(model.trainable_weights), n(model.non_trainable_weights)


def _counts_fl(model: fl.Model) -> tuple[int, int, int]:
    lines: list[str] = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    direct = (
        model.count_params(),
        sum(t.numel() for t in model.trainable_weights),
        sum(t.numel() for t in model.non_trainable_weights),
    )
    for label, value in zip(("Total", "Trainable", "Non-trainable"), direct):
        assert f"{label} params: {value:,} " in text
    return direct


def _dense_pair(lora_alpha=None):
    torch.manual_seed(0)
    f = fl.Sequential([nn.Linear(6, 3)])
    k = keras.Sequential([keras.Input((6,)), L.Dense(3)])
    k.layers[0].set_weights(
        [f.module[0].weight.detach().numpy().T, f.module[0].bias.numpy(force=True)]
    )
    k.layers[0].enable_lora(2, lora_alpha=lora_alpha)
    f.enable_lora(2, lora_alpha=lora_alpha)
    return f, k


def test_dense_counts_equal_keras_21_trainable_18_frozen():
    f, k = _dense_pair()
    assert _counts_keras(k) == _counts_fl(f) == (39, 21, 18)
    assert [w.path.split("/")[-1] for w in k.layers[0].trainable_weights] == [
        "bias",
        "lora_kernel_a",
        "lora_kernel_b",
    ]
    assert [n for n, p in f.module.named_parameters() if p.requires_grad] == [
        "linear.bias",
        "linear.lora_kernel_a",
        "linear.lora_kernel_b",
    ]
    # shapes as Keras: a (in, rank), b (rank, out)
    assert [tuple(w.shape) for w in k.layers[0].weights[2:]] == [(6, 2), (2, 3)]
    assert [tuple(t.shape) for t in f.layers[0].weights[2:]] == [(6, 2), (2, 3)]


@pytest.mark.parametrize(
    "build",
    ["conv2d", "conv1d", "embedding"],
)
def test_conv_and_embedding_counts_equal_keras(build):
    if build == "conv2d":
        f = fl.Sequential([nn.Conv2d(3, 4, 3)])
        k = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3)])
    elif build == "conv1d":
        f = fl.Sequential([nn.Conv1d(3, 5, 4)])
        k = keras.Sequential([keras.Input((10, 3)), L.Conv1D(5, 4)])
    else:
        f = fl.Sequential([nn.Embedding(10, 4)])
        k = keras.Sequential([keras.Input((5,), dtype="int32"), L.Embedding(10, 4)])
    k.layers[0].enable_lora(3)
    f.enable_lora(3)
    assert _counts_keras(k) == _counts_fl(f)
    assert [tuple(w.shape) for w in k.layers[0].weights[-2:]] == [
        tuple(t.shape) for t in f.layers[0].weights[-2:]
    ]


def _randomise_adapters(k_layer, f_module, names=("lora_kernel_a", "lora_kernel_b")):
    """Non-zero adapters (b starts at zero), the same values on both sides."""
    rng = np.random.default_rng(1)
    for name in names:
        value = rng.normal(size=tuple(getattr(f_module, name).shape)).astype("float32") * 0.3
        getattr(k_layer, name).assign(value)
        with torch.no_grad():
            getattr(f_module, name).copy_(torch.from_numpy(value))


@pytest.mark.parametrize("lora_alpha", [None, 8])
def test_dense_outputs_equal_keras(lora_alpha):
    f, k = _dense_pair(lora_alpha)
    _randomise_adapters(k.layers[0], f.module[0])
    x = np.random.default_rng(2).normal(size=(7, 6)).astype("float32")
    np.testing.assert_allclose(f(torch.from_numpy(x)).detach().numpy(), k(x).numpy(), atol=1e-6)


def test_conv2d_outputs_equal_keras():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    f = fl.Sequential([conv])
    k = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, padding="same")])
    k.layers[0].set_weights(
        [conv.weight.detach().numpy().transpose(2, 3, 1, 0), conv.bias.numpy(force=True)]
    )
    k.layers[0].enable_lora(2, lora_alpha=3)
    f.enable_lora(2, lora_alpha=3)
    _randomise_adapters(k.layers[0], conv)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    ours = f(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, k(x).numpy(), atol=1e-6)


def test_embedding_outputs_equal_keras():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    f = fl.Sequential([emb])
    k = keras.Sequential([keras.Input((5,), dtype="int32"), L.Embedding(10, 4)])
    k.layers[0].set_weights([emb.weight.detach().numpy()])
    k.layers[0].enable_lora(2)
    f.enable_lora(2)
    _randomise_adapters(k.layers[0], emb, ("lora_embeddings_a", "lora_embeddings_b"))
    x = np.random.default_rng(2).integers(0, 10, size=(3, 5))
    np.testing.assert_allclose(
        f(torch.from_numpy(x)).detach().numpy(), k(x.astype("int32")).numpy(), atol=1e-6
    )


def test_training_with_lora_and_a_frozen_layer_matches_keras_over_epochs():
    """Three epochs of Adam: a frozen Dense, a LoRA Dense (alpha 4), a trainable head."""
    torch.manual_seed(0)
    f = fl.Sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)])
    k = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, activation="tanh"),
            L.Dense(8, activation="tanh"),
            L.Dense(3),
        ]
    )
    dense = [m for m in f.module if isinstance(m, nn.Linear)]
    for kl, m in zip(k.layers, dense):
        kl.set_weights([m.weight.detach().numpy().T, m.bias.numpy(force=True)])
    k.layers[0].trainable = False
    f.layers[0].trainable = False
    k.layers[1].enable_lora(2, lora_alpha=4)
    f.enable_lora(2, "linear_1", lora_alpha=4)
    lora = dense[1]
    # Keras' he_uniform draw for a, copied over (b is zero on both sides)
    with torch.no_grad():
        lora.lora_kernel_a.copy_(torch.from_numpy(k.layers[1].lora_kernel_a.numpy()))
    assert _counts_keras(k) == _counts_fl(f)
    frozen_kernels = [dense[0].weight.detach().clone(), lora.weight.detach().clone()]

    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = rng.integers(0, 3, 48)
    k.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    kh = k.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    f.compile(optimizer=fl.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    fh = f.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)

    np.testing.assert_allclose(fh.history["loss"], kh.history["loss"], rtol=1e-4)
    assert torch.equal(dense[0].weight, frozen_kernels[0])
    assert torch.equal(lora.weight, frozen_kernels[1])  # the LoRA kernel: bitwise unchanged
    np.testing.assert_allclose(
        lora.lora_kernel_a.detach().numpy(), k.layers[1].lora_kernel_a.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        lora.lora_kernel_b.detach().numpy(), k.layers[1].lora_kernel_b.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(lora.bias.detach().numpy(), k.layers[1].bias.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        dense[2].weight.detach().numpy().T, k.layers[2].kernel.numpy(), atol=1e-6
    )
    # the effective kernel Keras reports equals ours
    eff = (lora.weight + lora.lora_delta()).detach().numpy().T
    np.testing.assert_allclose(eff, k.layers[1].kernel.numpy(), atol=1e-6)
