"""Tests for frostline.engine.stages: stage decomposition of common vision models."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from torch import Tensor, nn

from frostline.engine.stages import (
    Stage,
    register_stages,
    stage_parameters,
    stages_of,
    verify_stages,
)

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _nested(p: float) -> nn.Module:
    inner = timm.create_model("mobilenetv2_100", num_classes=7, drop_rate=p, drop_path_rate=p)
    return nn.Sequential(
        nn.Conv2d(3, 3, 1),
        nn.Sequential(inner, nn.ReLU()),
        nn.Linear(7, 4),
    )


# name -> builder(dropout / drop-path probability)
BUILDERS: dict[str, Callable[[float], nn.Module]] = {
    "timm_efficientnet_lite0": lambda p: timm.create_model(
        "efficientnet_lite0", num_classes=10, drop_rate=p, drop_path_rate=p
    ),
    "timm_mobilenetv2_100": lambda p: timm.create_model(
        "mobilenetv2_100", num_classes=10, drop_rate=p
    ),
    "timm_resnet18": lambda p: timm.create_model(
        "resnet18", num_classes=10, drop_rate=p, drop_path_rate=p
    ),
    "tv_resnet18": lambda p: torchvision.models.resnet18(num_classes=10),
    "tv_mobilenet_v2": lambda p: torchvision.models.mobilenet_v2(num_classes=10, dropout=p),
    "tv_efficientnet_b0": lambda p: torchvision.models.efficientnet_b0(
        num_classes=10, dropout=p, stochastic_depth_prob=p
    ),
    "nested_sequential": _nested,
}


@functools.cache
def _build(name: str, p: float) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name](p)


def _compose(stages: list[Stage], x: Tensor) -> Tensor:
    for st in stages:
        x = st.fn(x)
    return x


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("train", [False, True])
def test_composition_equals_forward(name: str, p: float, train: bool) -> None:
    model = _build(name, p).train(train)
    stages = stages_of(model)
    assert stages is not None and len(stages) > 3
    with torch.no_grad():
        torch.manual_seed(123)
        ref = model(X)
        torch.manual_seed(123)
        out = _compose(stages, X)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if (
        train and p > 0 and name != "tv_resnet18"
    ):  # randomness is real: another seed gives another output
        with torch.no_grad():
            torch.manual_seed(7)
            other = _compose(stages, X)
        assert not torch.equal(other, ref)
    assert verify_stages(model, stages, X)
    assert model.training is train


def test_paths_are_module_names_and_own_all_parameters(name: str) -> None:
    model = _build(name, 0.3)
    stages = stages_of(model)
    assert stages is not None
    named = dict(model.named_modules())
    assert len({s.path for s in stages}) == len(stages)
    for st in stages:
        if st.module is None:
            assert st.path not in named and "#" in st.path
            assert stage_parameters(model, st) == []
        else:
            assert named[st.path] is st.module
            expect = {id(p) for n, p in model.named_parameters() if n.startswith(st.path + ".")}
            assert {id(p) for p in stage_parameters(model, st)} == expect
    owned = [id(p) for st in stages for p in stage_parameters(model, st)]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_timm_efficientnet_expands_to_blocks() -> None:
    model = timm.create_model("efficientnet_lite0", drop_rate=0.2)
    paths = [s.path for s in stages_of(model) or []]
    n_blocks = sum(len(stage) for stage in model.blocks)
    assert paths[:2] == ["conv_stem", "bn1"]
    assert paths[2 : 2 + n_blocks] == [
        f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))
    ]
    assert paths[2 + n_blocks :] == [
        "conv_head",
        "bn2",
        "global_pool",
        "global_pool#dropout",
        "classifier",
    ]
    # no dropout configured -> no dropout stage
    plain = [s.path for s in stages_of(timm.create_model("mobilenetv2_100")) or []]
    assert plain[-3:] == ["bn2", "global_pool", "classifier"]


def test_tv_resnet_flatten_stage() -> None:
    paths = [s.path for s in stages_of(torchvision.models.resnet18()) or []]
    assert paths[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert paths[-3:] == ["avgpool", "avgpool#flatten", "fc"]


def test_expand_false_is_top_level() -> None:
    model = timm.create_model("mobilenetv2_100")
    assert [s.path for s in stages_of(model, expand=False) or []] == [
        "conv_stem",
        "bn1",
        "blocks",
        "conv_head",
        "bn2",
        "global_pool",
        "classifier",
    ]
    seq = nn.Sequential(nn.Sequential(nn.ReLU(), nn.ReLU()), nn.Identity())
    assert [s.path for s in stages_of(seq, expand=False) or []] == ["0", "1"]
    assert [s.path for s in stages_of(seq) or []] == ["0.0", "0.1", "1"]


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Sequential(nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x) * 2)


def test_unknown_module_is_none_until_registered() -> None:
    assert stages_of(_Custom()) is None
    assert stages_of(nn.Linear(2, 2)) is None
    assert stages_of(nn.Sequential(_Custom(), nn.ReLU()), expand=True) is not None

    @register_stages(_Custom)
    def _(m: _Custom) -> list[Stage]:
        return [
            Stage("a", m.a, m.a),
            Stage("a#double", None, lambda x: x * 2),
            Stage("b", m.b, m.b),
        ]

    model = nn.Sequential(_Custom(), nn.Tanh())
    stages = stages_of(model)
    assert stages is not None
    assert [s.path for s in stages] == ["0.a", "0.a#double", "0.b.0", "0.b.1", "1"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(_compose(stages, x), model(x), rtol=0, atol=0)
    assert verify_stages(model, stages, x)


def test_sequential_subclass_with_own_forward_is_not_decomposed() -> None:
    class Odd(nn.Sequential):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) + x

    assert stages_of(Odd(nn.Identity())) is None
    conv_norm_act = torchvision.ops.Conv2dNormActivation(3, 4)
    assert [s.path for s in stages_of(conv_norm_act) or []] == ["0", "1", "2"]


def test_adapters_refuse_unknown_configurations() -> None:
    class MyResNet(torchvision.models.ResNet):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    assert stages_of(MyResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])) is None
    model = timm.create_model("mobilenetv2_100")
    model.forward_head = lambda x, pre_logits=False: x  # type: ignore[method-assign]
    assert stages_of(model) is not None  # instance attribute: class methods are checked
    del model.forward_head
    del model.conv_head
    assert stages_of(model) is None
    feats = timm.create_model("mobilenetv2_100", features_only=True)
    assert stages_of(feats) is None


def test_verify_stages_detects_wrong_decomposition() -> None:
    model = timm.create_model("resnet18", num_classes=5, zero_init_last=False).train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))  # non-trivial BN running stats
    stages = stages_of(model)
    assert stages is not None
    assert verify_stages(model, stages, X)
    swapped = list(stages)
    assert [s.path for s in swapped[4:6]] == ["layer1.0", "layer1.1"]
    swapped[4], swapped[5] = swapped[5], swapped[4]  # same shapes, wrong order
    assert not verify_stages(model, swapped, X)
    assert not verify_stages(model, stages[:-1], X)  # missing fc -> shape mismatch
    assert not verify_stages(model, stages[::-1], X)  # raises inside -> False
    assert all(m.training for m in model.modules())  # flags restored


def test_verify_stages_non_tensor_output() -> None:
    class Pair(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x, x

    assert not verify_stages(Pair(), [Stage("id", None, lambda x: x)], torch.randn(2))
    net = nn.Sequential(nn.Linear(2, 2))
    assert not verify_stages(net, [Stage("0", None, lambda x: (x, x))], torch.randn(2))


def test_stage_validation() -> None:
    with pytest.raises(ValueError):
        Stage("", None, lambda x: x)
    with pytest.raises(TypeError):
        Stage("x", None, 3)  # type: ignore[arg-type]
