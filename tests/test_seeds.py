"""A Python counterpart of every example in the four seed files (../shared/seeds/).

* TF.js ``layer.trainable`` setter, examples 1-5 (on the offline EfficientNet-Lite0).
* "How does TensorFlow handle untrainable layers", examples 1-3.
* "Why does setting trainable=True have no effect" (Keras), examples 1-3.

Each test quotes the seed's intent; where frostline deliberately differs from the
seed's framework (no stale compile, no InputLayer at index 0) the test says so.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl

IMG = 32  # EfficientNet-Lite0 runs on any size >= 32; small keeps the CPU tests fast
N_CLASSES = 4


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def _lite0_full() -> fl.Model:
    return fl.models.pretrained("efficientnet_lite0")


@pytest.fixture(scope="module")
def _lite0_headless() -> fl.Model:
    return fl.models.pretrained("efficientnet_lite0", headless=True)


def _fresh(model: fl.Model, name: str) -> fl.Model:
    """A private, fully trainable copy of a cached zoo model (tests may mutate it)."""
    module = copy.deepcopy(model.module)
    fresh = fl.wrap(module, name=name)
    fresh.trainable = True
    return fresh


@pytest.fixture
def base(_lite0_full) -> fl.Model:
    return _fresh(_lite0_full, "efficientnet_lite0")


@pytest.fixture
def headless(_lite0_headless) -> fl.Model:
    return _fresh(_lite0_headless, "efficientnet_lite0")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = rng.random((16, 3, IMG, IMG), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, 16)
    return x, y


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def changed(before, tensors) -> list[bool]:
    return [not torch.equal(b, t) for b, t in zip(before, tensors, strict=True)]


# ====================================================== TF.js setter, examples 1-5


def test_tfjs_example1_freeze_all_base_layers(base):
    # baseModel.layers.forEach(layer => { layer.trainable = false; })
    for layer in base.layers:
        layer.trainable = False
    # console.log('Trainable weights:', baseModel.trainableWeights.length);  // 0
    assert len(base.trainable_weights) == 0
    assert len(base.non_trainable_weights) == len(base.weights) > 0
    assert all(not p.requires_grad for p in base.module.parameters())
    # the layers were frozen one by one, so the base's own flag was never set ...
    assert [layer.trainable for layer in base.layers] == [False] * len(base.layers)
    # ... and the counts still add up
    assert numel(base.non_trainable_weights) == base.count_params()


def test_tfjs_example2_unfreeze_last_five_top_level_layers(base):
    for layer in base.layers:
        layer.trainable = False
    # for (i = layers.length - 5; i < layers.length; i++) layers[i].trainable = true
    n = len(base.layers)
    for i in range(n - 5, n):
        base.layers[i].trainable = True
    flags = [(i, layer.name, layer.trainable) for i, layer in enumerate(base.layers)]
    assert [f[2] for f in flags] == [False] * (n - 5) + [True] * 5
    # what trains is exactly the parameters of those five layers
    expected = {id(p) for layer in base.layers[-5:] for p in layer.module.parameters()}
    assert {id(t) for t in base.trainable_weights} == expected
    assert expected  # the last five layers of Lite0 do own parameters
    # the same through the slice itself (Python's spelling of the loop)
    for layer in base.layers:
        layer.trainable = False
    for layer in base.layers[-5:]:
        layer.trainable = True
    assert {id(t) for t in base.trainable_weights} == expected


def test_tfjs_example2_unfreeze_last_five_leaf_layers(base):
    # Lite0's direct children are coarse (blocks is one layer); fine-tuning "the last
    # few layers" in the TF.js sense means the last weight-owning layers
    base.trainable = False
    leaves = base.leaf_layers()
    assert len(leaves) > 50
    for leaf in leaves[-5:]:
        leaf.trainable = True
    expected = {id(p) for leaf in leaves[-5:] for p in leaf.module.parameters(recurse=False)}
    assert {id(t) for t in base.trainable_weights} == expected
    assert [leaf.trainable for leaf in base.leaf_layers()] == [False] * (len(leaves) - 5) + [
        True
    ] * 5
    # the selector says the same, and its plan names the same layers
    base.trainable = False
    plan = base.unfreeze(fl.select.last(5))
    assert plan.paths == [leaf.path for leaf in leaves[-5:]]
    assert {id(t) for t in base.trainable_weights} == expected


def test_tfjs_example3_freeze_by_layer_type(base):
    # freeze only convolutional layers (depthwise too), leave batch norm unfrozen
    conv_leaves = []
    for leaf in base.leaf_layers():
        if isinstance(leaf.module, nn.Conv2d):  # Conv2d, Conv2dSame, depthwise (groups=C)
            leaf.trainable = False
            conv_leaves.append(leaf)
    assert any(leaf.module.groups > 1 for leaf in conv_leaves), "depthwise convs are Conv2d too"
    trainable_count = numel(base.trainable_weights)
    non_trainable_count = numel(base.non_trainable_weights)
    conv_params = sum(p.numel() for leaf in conv_leaves for p in leaf.module.parameters())
    bn = [m for m in base.module.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in bn)
    bn_running = sum(m.running_mean.numel() + m.running_var.numel() for m in bn)
    classifier = sum(p.numel() for p in base.module.classifier.parameters())
    assert trainable_count == bn_affine + classifier
    assert non_trainable_count == conv_params + bn_running
    assert trainable_count + non_trainable_count == base.count_params()
    # the top-level spelling of the seed (class name check) finds the head conv
    top = [layer for layer in base.layers if layer.class_name in ("Conv2d", "Conv2dSame")]
    assert [layer.name for layer in top] == ["conv_stem", "conv_head"]
    # and the selector form gives the same counts
    other = _fresh(base, "again")
    other.freeze(fl.select.of_type(nn.Conv2d))
    assert numel(other.trainable_weights) == trainable_count
    assert numel(other.non_trainable_weights) == non_trainable_count


def _transfer_model(headless: fl.Model) -> fl.Model:
    return fl.Sequential([headless, nn.Linear(1280, N_CLASSES)], name="transfer")


def test_tfjs_example4_two_phase_training(headless, images):
    x, y = images
    # Phase 1: freeze all base layers, train only the task head
    for layer in headless.layers:
        layer.trainable = False
    transfer = _transfer_model(headless)
    head = transfer.layers[1]
    transfer.compile(
        optimizer=fl.optimizers.Adam(0.001),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    base_before = snapshot(headless.weights)
    head_before = snapshot(head.weights)
    h1 = transfer.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert set(h1.history) >= {"loss", "accuracy"} and len(h1.history["loss"]) == 2
    assert not any(changed(base_before, headless.weights)), (
        "frozen base must not change (BN stats included)"
    )
    assert all(changed(head_before, head.weights))
    assert transfer.learning_rate == pytest.approx(1e-3)

    # Phase 2: unfreeze the last base layers, recompile with a lower rate
    unfrozen = headless.leaf_layers()[-10:]
    for leaf in unfrozen:
        leaf.trainable = True
    transfer.compile(
        optimizer=fl.optimizers.Adam(0.00001),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    assert transfer.learning_rate == pytest.approx(1e-5)
    unfrozen_ids = {id(p) for leaf in unfrozen for p in leaf.module.parameters(recurse=False)}
    still_frozen = [p for p in headless.module.parameters() if id(p) not in unfrozen_ids]
    frozen_before = snapshot(still_frozen)
    tuned_before = snapshot([p for leaf in unfrozen for p in leaf.module.parameters(recurse=False)])
    h2 = transfer.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert len(h2.history["loss"]) == 1
    assert not any(changed(frozen_before, still_frozen))
    assert all(
        changed(
            tuned_before, [p for leaf in unfrozen for p in leaf.module.parameters(recurse=False)]
        )
    )
    assert [g["lr"] for g in transfer.optimizer.param_groups] == pytest.approx(
        [1e-5] * len(transfer.optimizer.param_groups)
    )


def test_tfjs_example5_summary_verifies_freeze_state(headless):
    headless.trainable = False
    transfer = _transfer_model(headless)
    lines = []
    transfer.summary(print_fn=lines.append)
    text = "\n".join(lines)
    head_params = 1280 * N_CLASSES + N_CLASSES
    total = transfer.count_params()
    assert f"Total params: {total:,}" in text
    assert f"Trainable params: {head_params:,}" in text
    assert f"Non-trainable params: {total - head_params:,}" in text
    assert total == headless.count_params() + head_params
    # the base is one row, shown as not trainable; the head as trainable
    rows = {
        line.split()[0]: line.split()[-1]
        for line in text.splitlines()
        if line.startswith(("efficientnet", "linear"))
    }
    assert rows == {"efficientnet_lite0": "N", "linear": "Y"}


# ============================== "How does TensorFlow handle untrainable layers" 1-3


def test_tf_example1_frozen_layer_gets_no_gradients():
    torch.manual_seed(0)
    layer = fl.wrap(nn.Sequential(nn.Linear(5, 10), nn.ReLU()), name="dense")
    layer.trainable = False
    x = torch.randn(1, 5, requires_grad=True)  # something upstream that does train
    output = layer(x)
    initial = snapshot(layer.weights)
    loss = output.sum()
    loss.backward()
    # gradients of the frozen weights are None (TF: tape.gradient(...) -> [None, None])
    assert [w.grad for w in layer.weights] == [None, None]
    assert layer.trainable_weights == []
    # the forward is unchanged and gradients still flow through to the input (SPEC 5)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(changed(initial, layer.weights))
    # autograd refuses to differentiate w.r.t. a frozen weight: there is nothing to compute
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(layer(x).sum(), layer.weights)


def _softmax_mlp() -> fl.Model:
    return fl.Sequential(
        [
            nn.Linear(100, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
            nn.Softmax(dim=1),
        ]
    )


def test_tf_example2_sequential_frozen_layers_unchanged_by_optimizer():
    torch.manual_seed(0)
    model = _softmax_mlp()
    dense = [layer for layer in model.layers if layer.class_name == "Linear"]
    dense[0].trainable = False
    dense[1].trainable = False
    input_data = torch.randn(1, 100)
    before = [snapshot(d.weights) for d in dense]
    optimizer = torch.optim.Adam(model.trainable_weights, lr=0.01)
    for _ in range(2):
        predictions = model(input_data)
        target = nn.functional.one_hot(torch.randint(0, 10, (1,)), 10).float()
        loss = -(target * predictions.clamp_min(1e-7).log()).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not any(changed(before[0], dense[0].weights))
    assert not any(changed(before[1], dense[1].weights))
    assert all(changed(before[2], dense[2].weights))
    # the same through fit
    model.compile(optimizer=fl.optimizers.Adam(0.01), loss="categorical_crossentropy")
    x = torch.randn(8, 100)
    y = nn.functional.one_hot(torch.randint(0, 10, (8,)), 10).float()
    before = [snapshot(d.weights) for d in dense]
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert not any(changed(before[0], dense[0].weights))
    assert not any(changed(before[1], dense[1].weights))
    assert all(changed(before[2], dense[2].weights))


class FunctionalNet(nn.Module):
    """The seed's functional model: Input(10) -> Dense(64) -> Dense(32) -> Dense(1, sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(10, 64)
        self.dense_1 = nn.Linear(64, 32)
        self.dense_2 = nn.Linear(32, 1)

    def forward(self, x):
        x = torch.relu(self.dense(x))
        x = torch.relu(self.dense_1(x))
        return torch.sigmoid(self.dense_2(x))


def test_tf_example3_functional_model_get_layer_by_index():
    torch.manual_seed(0)
    model = fl.wrap(FunctionalNet())
    # Keras counts its InputLayer as index 0; a torch module has none, so the first
    # Dense is index 0 here (and index=1/2 of the seed are index=0/1)
    model.get_layer(index=0).trainable = False  # first dense layer
    model.get_layer(index=1).trainable = False  # second dense layer
    assert model.get_layer(index=0).module is model.module.dense
    assert model.get_layer(index=-1).module is model.module.dense_2
    assert model.get_layer(name="dense_1").trainable is False
    input_data = torch.randn(1, 10)
    layers = model.layers
    before = [snapshot(layer.weights) for layer in layers]
    optimizer = torch.optim.Adam(model.trainable_weights, lr=0.01)
    predictions = model(input_data)
    loss = nn.functional.binary_cross_entropy(predictions, torch.zeros(1, 1))
    loss.backward()
    optimizer.step()
    assert [any(changed(b, layer.weights)) for b, layer in zip(before, layers)] == [
        False,
        False,
        True,
    ]
    assert model.module.dense.weight.grad is None and model.module.dense_1.weight.grad is None
    # and through fit with a Keras loss name
    model.compile(optimizer="adam", loss="binary_crossentropy")
    before = [snapshot(layer.weights) for layer in layers]
    model.fit(torch.randn(8, 10), torch.zeros(8, 1), epochs=1, batch_size=4, verbose=0)
    assert [any(changed(b, layer.weights)) for b, layer in zip(before, layers)] == [
        False,
        False,
        True,
    ]


# ============== "Why does setting trainable=True have no effect" (Keras), examples 1-3


def _vgg_like(headless: fl.Model) -> fl.Model:
    # keras.Sequential([base_model, GlobalAveragePooling2D(), Dense(10, softmax)]);
    # the headless Lite0 already ends in global average pooling
    return fl.Sequential([headless, nn.Linear(1280, 10), nn.Softmax(dim=1)])


def _onehot_images(n: int = 4):
    rng = np.random.default_rng(1)
    x = rng.random((n, 3, IMG, IMG), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
    return x, y


def test_keras_example1_unfreeze_after_compile_trains_without_recompiling(headless):
    base_model = headless
    base_model.trainable = False
    model = _vgg_like(base_model)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    # the seed's "incorrect" order: set trainable after compile, do not recompile
    for layer in base_model.layers:
        layer.trainable = True
    x, y = _onehot_images()
    before = snapshot(base_model.module.parameters())
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    after = list(base_model.module.parameters())
    # in Keras 3 this silently trains nothing of the base; in frostline it takes effect
    assert all(changed(before, after)), "every unfrozen base parameter must have been updated"
    assert model.optimizer is not None
    in_optimizer = {id(p) for g in model.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in after} <= in_optimizer


def test_keras_example2_unfreeze_then_compile_trains(headless):
    base_model = headless
    base_model.trainable = False
    model = _vgg_like(base_model)
    for layer in base_model.layers:
        layer.trainable = True
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    x, y = _onehot_images()
    before = snapshot(base_model.module.parameters())
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert all(changed(before, list(base_model.module.parameters())))
    assert set(history.history) >= {"loss", "accuracy"}


def _mnist_like() -> fl.Model:
    return fl.Sequential(
        [
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 13 * 13, 10),
            nn.Softmax(dim=1),
        ]
    )


@pytest.mark.parametrize("recompile", [True, False], ids=["compile-original", "no-recompile"])
def test_keras_example3_nested_sub_model_unfreeze(recompile):
    torch.manual_seed(0)
    model = _mnist_like()
    conv = model.layers[0]
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    conv.trainable = False
    # a sub-model over the first layers of the model shares their modules (no copy)
    sub_model = fl.wrap(
        nn.Sequential(*[layer.module for layer in model.layers[:4]]), name="sub_model"
    )
    assert sub_model.layers[0].module is conv.module
    assert sub_model.layers[0].trainable is False and conv.trainable is False
    for layer in sub_model.layers:
        layer.trainable = True
    # the flag lives on the shared module: the original model sees it at once
    assert conv.trainable is True and conv.module.weight.requires_grad
    if recompile:  # "compile the original model, not the sub-model"
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
    rng = np.random.default_rng(0)
    x = rng.random((16, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 16)
    before = snapshot(conv.weights)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert all(changed(before, conv.weights))


def test_keras_example3_nested_model_is_one_layer_and_unfreezes_through_parent():
    # the nested case the seed warns about: trainability set on a container reaches
    # every layer below it, and a child set afterwards changes only its own subtree
    inner = fl.Sequential([nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten()], name="features")
    model = fl.Sequential([inner, nn.Linear(4 * 6 * 6, 10)])
    assert model.layers[0] is inner and len(model.layers) == 2
    model.trainable = False
    assert inner.trainable is False and inner.layers[0].trainable is False
    inner.layers[0].trainable = True
    assert model.trainable is False and inner.trainable is False
    assert {id(t) for t in model.trainable_weights} == {
        id(p) for p in inner.layers[0].module.parameters()
    }
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = snapshot(model.weights)
    model.fit(
        np.random.rand(8, 1, 8, 8).astype("float32"),
        np.arange(8) % 10,
        epochs=1,
        batch_size=4,
        verbose=0,
    )
    moved = changed(before, model.weights)
    conv_ids = {id(p) for p in inner.layers[0].module.parameters()}
    assert [m for m, w in zip(moved, model.weights) if id(w) in conv_ids] == [True, True]
    assert not any(m for m, w in zip(moved, model.weights) if id(w) not in conv_ids)
