"""The layer API: wrapping, Sequential, layers, get_layer, the setter, selectors, summary."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import frostline as fl
from frostline.api.layer import own_weights

# ------------------------------------------------------------------------- helpers


def parse_counts(text: str) -> tuple[int, int, int]:
    def grab(label: str) -> int:
        m = re.search(rf"^{label} params: ([\d,]+)", text, re.MULTILINE)
        assert m, f"no '{label} params' line in:\n{text}"
        return int(m.group(1).replace(",", ""))

    return grab("Total"), grab("Trainable"), grab("Non-trainable")


def summary_of(model: fl.Model, **kwargs) -> str:
    lines: list[str] = []
    model.summary(print_fn=lines.append, **kwargs)
    return "\n".join(lines)


def table_rows(text: str) -> list[str]:
    """The rows between the header's '=' rule and the closing '=' rule."""
    lines = text.splitlines()
    rules = [i for i, ln in enumerate(lines) if ln and set(ln) == {"="}]
    assert len(rules) == 2, text
    return [ln for ln in lines[rules[0] + 1 : rules[1]] if ln and set(ln) != {"-"}]


def expected_weights(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and float buffers, each tensor once (SPEC 1), computed independently."""
    out, seen = [], set()
    for m in module.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is None or not (t.is_floating_point() or t.is_complex()) or id(t) in seen:
                continue
            seen.add(id(t))
            out.append(t)
    return out


class HandWritten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU())
        self.norm = nn.BatchNorm1d(16)
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 3), "b": nn.Linear(16, 1)})
        self.register_buffer("scale", torch.ones(16))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens).mean(dim=1)) * self.scale
        h = self.norm(h)
        return {"a": self.heads["a"](h), "b": self.heads["b"](h)}


def _tiny_timm_lite0() -> nn.Module:
    return timm.create_model("efficientnet_lite0", pretrained=False)


# ============================================================================= wrap


@pytest.mark.parametrize(
    "factory",
    [_tiny_timm_lite0, lambda: torchvision.models.resnet18(weights=None), HandWritten],
    ids=["timm-efficientnet_lite0", "torchvision-resnet18", "hand-written"],
)
def test_wrap_any_module(factory):
    module = factory()
    model = fl.wrap(module)
    assert model.module is module, "wrap never copies"
    assert isinstance(model, fl.Model)
    assert model.class_name == type(module).__name__
    assert [layer.name for layer in model.layers] == [n for n, _ in module.named_children()]
    assert all(
        layer.module is child for layer, (_, child) in zip(model.layers, module.named_children())
    )
    exp = expected_weights(module)
    assert [id(t) for t in model.weights] == [id(t) for t in exp]
    assert model.count_params() == sum(t.numel() for t in exp)
    n_params = sum(p.numel() for p in module.parameters())
    assert sum(t.numel() for t in model.trainable_weights) == n_params
    text = summary_of(model)
    total, tr, nt = parse_counts(text)
    assert (total, tr, nt) == (model.count_params(), n_params, model.count_params() - n_params)
    # integer buffers are not weights
    assert not any(t.dtype == torch.long for t in model.weights)


def test_wrap_rejects_non_modules_and_unwraps_layers():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fl.wrap(object())  # type: ignore[arg-type]
    lin = nn.Linear(2, 2)
    layer = fl.Layer(lin, name="x")
    assert fl.wrap(layer).module is lin


def test_wrap_name_and_default_name():
    assert fl.wrap(nn.BatchNorm2d(3)).name == "batch_norm2d"
    assert fl.wrap(nn.Linear(2, 2), name="dense").name == "dense"


def test_wrap_twice_is_consistent():
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    a, b = fl.wrap(module), fl.wrap(module)
    a.layers[0].trainable = False
    assert b.layers[0].trainable is False
    assert [id(t) for t in a.trainable_weights] == [id(t) for t in b.trainable_weights]
    b.trainable = True
    assert a.layers[0].trainable is True and len(a.trainable_weights) == 4
    # a fresh view of the same child agrees too
    assert fl.Layer(module[0]).trainable is True


def test_plain_pytorch_sees_freezing():
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = fl.wrap(module)
    model.layers[0].trainable = False
    assert [p.requires_grad for p in module.parameters()] == [False, False, True, True]
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    w0 = module[0].weight.detach().clone()
    module(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert module[0].weight.grad is None and torch.equal(module[0].weight, w0)
    # and frostline sees what plain PyTorch did
    module[2].requires_grad_(False)
    assert model.trainable_weights == []
    assert fl.wrap(module).layers[2].trainable is False


# ======================================================================= Sequential


def test_sequential_of_modules_and_models():
    base = fl.wrap(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), name="base")
    model = fl.Sequential([base, nn.Linear(4, 4), nn.Linear(4, 2)])
    assert len(model.layers) == 3
    assert model.layers[0] is base, "a nested Model is one layer, the same object"
    assert [layer.name for layer in model.layers] == ["base", "linear", "linear_1"]
    assert model.layers[1].class_name == "Linear"
    assert model(torch.randn(3, 8)).shape == (3, 2)
    base.trainable = False
    assert model.layers[0].trainable is False
    assert {id(t) for t in model.non_trainable_weights} == {id(p) for p in base.module.parameters()}
    with pytest.raises(TypeError, match="list"):
        fl.Sequential(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fl.Sequential([nn.Linear(2, 2), "relu"])  # type: ignore[list-item]


def test_sequential_constructor_trainable_false_reaches_children():
    # SPEC 2: unlike Keras 3, the constructor argument freezes the children as well
    model = fl.Sequential([nn.Linear(2, 3), nn.Linear(3, 1)], trainable=False)
    assert model.trainable is False
    assert [layer.trainable for layer in model.layers] == [False, False]
    assert model.trainable_weights == []


def test_sequential_add_and_pop():
    model = fl.Sequential([nn.Linear(2, 3)])
    model.add(nn.ReLU())
    model.add(nn.Linear(3, 1))
    assert [layer.class_name for layer in model.layers] == ["Linear", "ReLU", "Linear"]
    popped = model.pop()
    assert popped.class_name == "Linear" and len(model.layers) == 2


# ======================================================================= layers list


def test_layers_is_list_like():
    model = fl.wrap(
        nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    )
    layers = model.layers
    assert len(layers) == 5
    assert layers[-1].module is model.module[4]
    assert layers[-5].module is model.module[0]
    assert [layer.class_name for layer in layers[1:4]] == ["ReLU", "Linear", "Tanh"]
    assert [layer.name for layer in layers[::2]] == ["0", "2", "4"]
    assert [layer.name for layer in layers[-2:]] == ["3", "4"]
    assert len(layers[10:]) == 0
    assert [layer.name for layer in layers] == ["0", "1", "2", "3", "4"]
    assert layers[1] in list(layers)
    for layer in layers[-2:]:
        layer.trainable = False
    assert (
        model.module[4].weight.requires_grad is False
        and model.module[2].weight.requires_grad is True
    )
    with pytest.raises(IndexError, match=r"-5\.\.4"):
        layers[5]
    with pytest.raises(IndexError, match=r"-5\.\.4"):
        layers[-6]
    with pytest.raises(TypeError):
        layers[1.0]  # type: ignore[call-overload]
    # like a list, any integer type indexes (NumPy ints from arithmetic on arrays)
    assert layers[np.int64(-1)] is layers[4]
    assert model.get_layer(index=np.int32(2)) is layers[2]


def test_layers_follow_module_changes():
    module = nn.Sequential(nn.Linear(2, 2))
    model = fl.wrap(module)
    assert len(model.layers) == 1
    module.append(nn.ReLU())
    assert len(model.layers) == 2


def test_leaf_layers_order():
    model = fl.wrap(HandWritten())
    leaves = model.leaf_layers()
    assert [leaf.path for leaf in leaves] == [
        "scale",
        "embed",
        "encoder.0",
        "encoder.1",
        "norm",
        "heads.a",
        "heads.b",
    ]
    # the root owns the 'scale' buffer beside its children: a named leaf of its own, first
    assert leaves[0].module is model.module and leaves[0].class_name == "Buffer"
    assert [leaf.name for leaf in leaves] == ["scale", "embed", "0", "1", "norm", "a", "b"]
    resnet = fl.wrap(torchvision.models.resnet18(weights=None))
    paths = [leaf.path for leaf in resnet.leaf_layers()]
    owning = [n for n, m in resnet.module.named_modules() if own_weights(m)]
    assert paths == owning
    assert paths[:2] == ["conv1", "bn1"] and paths[-1] == "fc"


# ======================================================================== get_layer


def test_get_layer_by_dotted_name_and_index():
    resnet = fl.wrap(torchvision.models.resnet18(weights=None))
    conv = resnet.get_layer("layer1.0.conv1")
    assert conv.module is resnet.module.layer1[0].conv1
    assert conv.name == "conv1" and conv.class_name == "Conv2d"
    assert resnet.get_layer("layer2.0.downsample.1").class_name == "BatchNorm2d"
    assert resnet.get_layer(index=0).name == "conv1"
    assert resnet.get_layer(index=-1).name == "fc"
    assert resnet.get_layer("fc").module is resnet.module.fc
    resnet.get_layer("layer4").trainable = False
    assert not any(p.requires_grad for p in resnet.module.layer4.parameters())
    assert all(p.requires_grad for p in resnet.module.layer3.parameters())


def test_get_layer_needs_exactly_one_of_name_and_index():
    model = fl.wrap(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="exactly one"):
        model.get_layer()
    with pytest.raises(ValueError, match="exactly one"):
        model.get_layer("0", index=0)
    with pytest.raises(IndexError, match=r"-1\.\.0"):
        model.get_layer(index=3)


def test_get_layer_unknown_name_lists_closest():
    resnet = fl.wrap(torchvision.models.resnet18(weights=None))
    with pytest.raises(ValueError) as info:
        resnet.get_layer("layer5")
    msg = str(info.value)
    assert "'layer5'" in msg and "Closest" in msg and "layer4" in msg
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1") as info:
        resnet.get_layer("layer1.0.conv3")
    assert "'layer1.0.conv3'" in str(info.value)


def test_get_layer_in_nested_model():
    base = fl.wrap(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), name="base")
    model = fl.Sequential([base, nn.Linear(4, 1)])
    assert model.get_layer("base") is base
    assert model.get_layer("base.1").module is base.module[1]
    assert model.get_layer("linear").class_name == "Linear"


# ========================================================================== setter


@pytest.mark.parametrize("bad", ["no", 0, 1, None, 1.0, np.bool_(False)])
def test_trainable_setter_needs_a_bool(bad):
    model = fl.wrap(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="bool"):
        model.trainable = bad
    with pytest.raises(TypeError, match="bool"):
        model.layers[0].trainable = bad
    assert model.module[0].weight.requires_grad, "a rejected value changes nothing"


def test_setter_recursion_and_getter_returns_own_flag():
    model = fl.wrap(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1)))
    model.trainable = False
    assert [layer.trainable for layer in model.layers] == [False, False]
    assert model.get_layer("0.1").trainable is False
    model.get_layer("0.1").trainable = True
    assert model.trainable is False and model.layers[0].trainable is False
    assert model.get_layer("0.1").trainable is True
    assert {id(t) for t in model.trainable_weights} == {
        id(p) for p in model.module[0][1].parameters()
    }
    # the trainable child's weights are trainable weights of every container above it
    assert len(model.layers[0].trainable_weights) == 2


def test_class_name_and_module_identity():
    bn = nn.BatchNorm2d(3)
    model = fl.wrap(nn.Sequential(nn.Conv2d(3, 3, 1), bn))
    assert [layer.class_name for layer in model.layers] == ["Conv2d", "BatchNorm2d"]
    assert model.layers[1].module is bn
    assert model.get_layer("1").module is bn


def test_weights_views_partition_and_shared_tensor_once():
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight  # tied
    model = fl.wrap(nn.Sequential(a, nn.ReLU(), b))
    assert model.count_params() == 16 + 4 + 4
    assert len(model.weights) == 3
    model.layers[2].trainable = False  # freezes the tied weight for both
    assert {id(t) for t in model.trainable_weights} == {id(a.bias)}
    ids_t = {id(t) for t in model.trainable_weights}
    ids_n = {id(t) for t in model.non_trainable_weights}
    assert not ids_t & ids_n and ids_t | ids_n == {id(t) for t in model.weights}


# ======================================================================== selectors


def _mlp() -> fl.Model:
    base = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()), name="base")
    return fl.Sequential([base, nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 2)], name="top")


def _flags(model: fl.Model) -> list[tuple[str, bool]]:
    return [(leaf.path, leaf.trainable) for leaf in model.leaf_layers()]


def test_selectors_pick_leaf_layers():
    model = _mlp()
    paths = ["base.0", "base.1", "linear", "linear_1"]
    assert [leaf.path for leaf in model.leaf_layers()] == paths

    def picked(sel):
        return model.freeze(sel, dry_run=True).paths

    assert picked(fl.select.first(2)) == paths[:2]
    assert picked(fl.select.last(1)) == paths[-1:]
    assert picked(fl.select.last(99)) == paths
    assert picked(fl.select.between(1, 3)) == paths[1:3]
    assert picked(fl.select.between(-2, None)) == paths[-2:]
    assert picked(fl.select.name("base")) == paths[:2]  # everything inside a container
    assert picked(fl.select.name("linear*")) == paths[2:]
    assert picked("base.*") == paths[:2]  # a bare glob string is a name selector
    assert picked(fl.select.regex(r"linear(_\d+)?")) == paths[2:]
    assert picked(fl.select.of_type("BatchNorm1d")) == ["base.1"]
    assert picked(fl.select.of_type(nn.Linear)) == ["base.0", "linear", "linear_1"]
    # leaves inside a matching container (below the root) count too
    assert picked(fl.select.of_type(nn.Sequential)) == paths[:2]
    assert picked(None) == paths
    assert picked([fl.select.first(1), "linear_1"]) == ["base.0", "linear_1"]


def test_selector_composition():
    model = _mlp()

    def picked(sel):
        return model.freeze(sel, dry_run=True).paths

    assert picked(fl.select.first(1) | fl.select.last(1)) == ["base.0", "linear_1"]
    assert picked(fl.select.name("base") & fl.select.of_type(nn.Linear)) == ["base.0"]
    assert picked(~fl.select.of_type("BatchNorm1d")) == ["base.0", "linear", "linear_1"]
    assert picked(~fl.select.name("base") & ~fl.select.last(1)) == ["linear"]


def test_dry_run_changes_nothing_and_reports_the_plan():
    model = _mlp()
    before = [p.requires_grad for p in model.module.parameters()]
    flags = _flags(model)
    plan = model.freeze(fl.select.first(2), dry_run=True)
    assert [p.requires_grad for p in model.module.parameters()] == before
    assert _flags(model) == flags
    assert plan.applied is False
    assert [c.path for c in plan.changes] == ["base.0", "base.1"]
    assert sum(c.params for c in plan.changes) == 40 + 32
    assert str(plan).startswith("[dry run]")
    assert "72 params" in plan.summary_line()
    real = model.freeze(fl.select.first(2))
    assert real.applied and real.paths == plan.paths
    assert _flags(model)[:2] == [("base.0", False), ("base.1", False)]
    # the base is fully covered, so the container follows its leaves
    assert model.layers[0].trainable is False
    # freezing again changes nothing, and says the layers already are frozen
    again = model.freeze(fl.select.first(2))
    assert again.changes == [] and again.paths == ["base.0", "base.1"]
    assert "already frozen" in str(again)
    model.unfreeze(fl.select.first(1))
    assert "already trainable" in str(model.unfreeze(fl.select.first(1)))


def test_freeze_and_unfreeze_apply():
    model = _mlp()
    model.freeze(fl.select.first(3))
    assert _flags(model) == [
        ("base.0", False),
        ("base.1", False),
        ("linear", False),
        ("linear_1", True),
    ]
    model.unfreeze(fl.select.of_type("BatchNorm1d"))
    assert _flags(model) == [
        ("base.0", False),
        ("base.1", True),
        ("linear", False),
        ("linear_1", True),
    ]
    model.freeze()  # everything
    assert model.trainable_weights == []
    model.unfreeze()
    assert all(p.requires_grad for p in model.module.parameters())


def test_selector_that_matches_nothing_names_the_selector():
    model = _mlp()
    with pytest.raises(fl.SelectionError) as info:
        model.freeze(fl.select.of_type("Conv2d"))
    msg = str(info.value)
    assert "of_type(Conv2d)" in msg and "'top'" in msg and "base.0" in msg and "linear_1" in msg
    with pytest.raises(fl.SelectionError, match=r"name\('enc\*'\)"):
        model.unfreeze("enc*")
    with pytest.raises(fl.SelectionError, match=r"regex"):
        model.freeze(fl.select.regex("nothing"), dry_run=True)
    assert isinstance(fl.SelectionError("x"), ValueError)
    with pytest.raises(ValueError):
        fl.select.first(-1)
    with pytest.raises(ValueError, match="regular expression"):
        fl.select.regex("(")
    with pytest.raises(TypeError):
        model.freeze(3.5)


# ========================================================================== summary


def test_summary_counts_and_bn_running_stats_are_non_trainable():
    model = fl.Sequential([nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)])
    total, tr, nt = parse_counts(summary_of(model))
    # Linear 40 + BN gamma/beta 16 + Linear 18 trainable; BN moving mean/var 16 not
    assert (total, tr, nt) == (90, 74, 16)
    model.layers[1].trainable = False
    assert parse_counts(summary_of(model)) == (90, 58, 32)
    model.trainable = False
    assert parse_counts(summary_of(model)) == (90, 0, 90)


def test_summary_thousands_separators_and_size():
    model = fl.wrap(nn.Linear(1000, 1000))
    text = summary_of(model)
    assert "Total params: 1,001,000 (3.82 MB)" in text
    assert "Trainable params: 1,001,000" in text
    assert "Non-trainable params: 0" in text


def test_summary_nested_model_row_and_expansion():
    base = fl.wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), name="base")
    model = fl.Sequential([base, nn.Flatten(), nn.LazyLinear(2)])
    model(torch.randn(1, 3, 6, 6))  # materialise the lazy layer
    base.trainable = False
    base.layers[1].trainable = True
    text = summary_of(model)
    rows = table_rows(text)
    assert len(rows) == 3
    assert rows[0].split()[:2] == ["base", "(Sequential)"] and rows[0].split()[-1] == "2/4"
    total, tr, nt = parse_counts(text)
    assert total == tr + nt == model.count_params()
    assert tr == 8 + 4 * 4 * 4 * 2 + 2  # BN gamma/beta + LazyLinear(64 -> 2)
    expanded = table_rows(summary_of(model, expand_nested=True, depth=2))
    assert len(expanded) == 6
    assert [r.split()[0] for r in expanded] == ["base", "0", "1", "2", "flatten", "lazy_linear"]
    assert parse_counts(summary_of(model, expand_nested=True, depth=2)) == (total, tr, nt)


@pytest.fixture(scope="module")
def b3() -> fl.Model:
    return fl.wrap(timm.create_model("efficientnet_b3", pretrained=False))


def test_summary_of_a_300_layer_model_is_readable(b3):
    n_modules = len(list(b3.module.modules()))
    assert n_modules > 300
    b3.trainable = True
    b3.freeze(fl.select.between(None, -20))
    text = summary_of(b3)
    rows = table_rows(text)
    assert len(rows) == len(b3.layers) == len(list(b3.module.children()))
    width = max(len(ln) for ln in text.splitlines())
    assert width <= 120
    total, tr, nt = parse_counts(text)
    assert total == tr + nt == b3.count_params()
    assert tr == sum(t.numel() for t in b3.trainable_weights)
    leaves_text = summary_of(b3, leaves=True)
    leaf_rows = table_rows(leaves_text)
    assert len(leaf_rows) == len(b3.leaf_layers()) > 200
    # rows are numbered by leaf index (what select.first/last/between count)
    assert leaf_rows[0].split()[0] == "0" and leaf_rows[-1].split()[0] == str(len(leaf_rows) - 1)
    assert [r.split()[-1] for r in leaf_rows[-20:]] == ["Y"] * 20
    assert all(r.split()[-1] == "N" for r in leaf_rows[:-20])
    assert parse_counts(leaves_text) == (total, tr, nt)
    assert max(len(ln) for ln in leaves_text.splitlines()) <= 120


def test_summary_optimizer_line_after_fit():
    model = fl.Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)])
    model.layers[0].trainable = False
    assert "Optimizer params" not in summary_of(model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(np.random.rand(16, 4).astype("float32"), np.arange(16) % 3, epochs=1, verbose=0)
    text = summary_of(model)
    m = re.search(r"^Optimizer params: ([\d,]+)", text, re.MULTILINE)
    assert m, text
    assert int(m.group(1).replace(",", "")) == 2 * 27  # Adam: two slots for the head only
    total, tr, nt = parse_counts(text)
    assert (total, tr, nt) == (67, 27, 40), "optimizer state is not added to Total"


def test_summary_with_input_shape_shows_output_shapes():
    model = fl.Sequential([nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)])
    model.module.train()
    text = summary_of(model, input_shape=(3, 8, 8))
    assert "(None, 4, 6, 6)" in text and "(None, 2)" in text
    assert model.module.training, "summary restores the training mode"
