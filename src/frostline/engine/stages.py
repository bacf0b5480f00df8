"""Decompose a model into an ordered list of stages whose composition is ``model.forward``.

The trainer runs the frozen prefix of a model (every stage before the first trainable one)
without autograd and caches its output. For that it needs the model as a list of
:class:`Stage` objects such that ``fn_n(...fn_2(fn_1(x)))`` equals ``model(x)``.

Decomposable are ``nn.Sequential`` (and subclasses that keep ``nn.Sequential.forward``)
and every class with a registered adapter (see :func:`register_stages`). Adapters ship
for timm ``EfficientNet`` (efficientnet_*, mobilenetv2_*, ...), timm ``ResNet``,
torchvision ``ResNet``, ``MobileNetV2`` and ``EfficientNet``.

Stage paths are the dotted names of ``root.named_modules()``. Stages without a module
(a functional op such as torchvision ResNet's ``torch.flatten(x, 1)``) get the path
``"<previous module path>#<op>"``, e.g. ``"avgpool#flatten"``: it names no module
and owns no parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Stage",
    "register_stages",
    "stage_parameters",
    "stages_of",
    "verify_stages",
]

Adapter = Callable[[Any], "list[Stage] | None"]
_M = TypeVar("_M", bound=nn.Module)

_ADAPTERS: dict[type, Adapter] = {}


@dataclass(frozen=True)
class Stage:
    """One step of a model's forward.

    ``path`` is the dotted module name relative to the root (never ``""``); ``module`` is
    the submodule at that path, or ``None`` for a functional step; ``fn`` is what to call,
    usually ``module`` itself.

    Example:
        >>> from torch import nn
        >>> s = Stage("0", nn.ReLU(), nn.ReLU())
        >>> s.path
        '0'
    """

    path: str
    module: nn.Module | None
    fn: Callable[[Tensor], Tensor]

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("Stage.path must be a non-empty string")
        if not callable(self.fn):
            raise TypeError("Stage.fn must be callable")

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


def register_stages(cls: type[_M]) -> Callable[[Callable[[_M], list[Stage] | None]], Adapter]:
    """Register an adapter that decomposes instances of ``cls`` (exact type) into stages.

    The adapter gets the instance and returns stages with paths relative to it (or
    ``None`` when that instance is in a configuration it does not handle). Stages whose
    ``fn`` is their ``module`` are expanded further by :func:`stages_of`.

    Example:
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(2, 2), nn.ReLU()
        ...     def forward(self, x):
        ...         return self.b(self.a(x))
        >>> @register_stages(Net)
        ... def _(m):
        ...     return [Stage("a", m.a, m.a), Stage("b", m.b, m.b)]
        >>> [s.path for s in stages_of(Net())]
        ['a', 'b']
    """

    def deco(fn: Callable[[_M], list[Stage] | None]) -> Adapter:
        _ADAPTERS[cls] = fn
        return fn

    return deco


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _mod(m: nn.Module, name: str) -> Stage:
    sub = getattr(m, name)
    return Stage(name, sub, sub)


def stages_of(module: nn.Module, *, expand: bool = True) -> list[Stage] | None:
    """The finest ordered decomposition of ``module``, or ``None`` if it is not known.

    Applying the stages' ``fn`` in order equals ``module(x)`` for a single tensor ``x``,
    in train and eval mode. With ``expand=False`` only the top level is decomposed.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
        >>> [s.path for s in stages_of(net)]
        ['0', '1.0', '1.1']
        >>> [s.path for s in stages_of(net, expand=False)]
        ['0', '1']
        >>> stages_of(nn.Linear(2, 2)) is None
        True
    """
    if _is_plain_sequential(module):
        top: list[Stage] | None = []
        for name, child in module._modules.items():
            if child is None:
                return None
            top.append(Stage(name, child, child))
    else:
        cls = type(module)
        adapter = _ADAPTERS.get(cls) or _NAMED_ADAPTERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if adapter is None:
            return None
        top = adapter(module)
    if top is None:
        return None
    if not expand:
        return list(top)
    out: list[Stage] = []
    for st in top:
        sub = stages_of(st.module) if st.module is not None and st.fn is st.module else None
        if sub is None:
            out.append(st)
        else:
            out.extend(Stage(f"{st.path}.{s.path}", s.module, s.fn) for s in sub)
    return out


def stage_parameters(root: nn.Module, stage: Stage) -> list[nn.Parameter]:
    """The parameters ``stage`` owns: those of ``root`` named ``stage.path + '.' + ...``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> [tuple(p.shape) for p in stage_parameters(net, stages_of(net)[0])]
        [(3, 4), (3,)]
    """
    prefix = stage.path + "."
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for name, p in root.named_parameters(remove_duplicate=False):
        if name.startswith(prefix) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def verify_stages(
    module: nn.Module,
    stages: list[Stage],
    example: Tensor,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> bool:
    """Check numerically (eval mode, no grad) that ``stages`` compose to ``module``.

    Training flags are restored afterwards. Non-tensor outputs or a mismatch give False.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> verify_stages(net, stages_of(net), torch.randn(3, 4))
        True
        >>> verify_stages(net, stages_of(net)[::-1][1:], torch.randn(3, 4))
        False
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            ref = module(example)
            y: Any = example
            for st in stages:
                y = st.fn(y)
        return _same_outputs(ref, y, rtol, atol)
    except Exception:
        return False
    finally:
        for m, t in flags:
            m.training = t


def _same_outputs(ref: Any, y: Any, rtol: float, atol: float) -> bool:
    """Tensors, or dicts/lists/tuples of tensors (multi-output models), equal within tolerance."""
    if isinstance(ref, Tensor):
        if not isinstance(y, Tensor) or ref.shape != y.shape or ref.dtype != y.dtype:
            return False
        return bool(torch.allclose(ref, y, rtol=rtol, atol=atol, equal_nan=True))
    if isinstance(ref, dict):
        return (
            isinstance(y, dict)
            and list(ref) == list(y)
            and all(_same_outputs(ref[k], y[k], rtol, atol) for k in ref)
        )
    if isinstance(ref, list | tuple):
        return (
            type(ref) is type(y)
            and len(ref) == len(y)
            and all(_same_outputs(a, b, rtol, atol) for a, b in zip(ref, y))
        )
    return False


# --------------------------------------------------------------------------- adapters


def _same_methods(m: nn.Module, cls: type, names: tuple[str, ...]) -> bool:
    return all(getattr(type(m), n, None) is getattr(cls, n) for n in names)


def _has(m: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Module) for n in names)


def _timm_head_dropout(m: Any, anchor: str) -> Stage:
    # timm: ``if self.drop_rate > 0.: x = F.dropout(x, p=self.drop_rate, training=self.training)``
    def head_dropout(x: Tensor) -> Tensor:
        p = float(m.drop_rate)
        return F.dropout(x, p=p, training=m.training) if p > 0.0 else x

    return Stage(f"{anchor}#dropout", None, head_dropout)


def _flatten1(x: Tensor) -> Tensor:
    return torch.flatten(x, 1)


def _adaptive_pool_1x1(x: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(x, (1, 1))


# Built-in adapters are keyed by class name, so ``import frostline`` does not import
# timm or torchvision; they apply to instances of exactly these classes.
_NAMED_ADAPTERS: dict[str, Adapter] = {}


def _named(qualname: str) -> Callable[[Adapter], Adapter]:
    def deco(fn: Adapter) -> Adapter:
        _NAMED_ADAPTERS[qualname] = fn
        return fn

    return deco


@_named("timm.models.efficientnet.EfficientNet")
def _timm_efficientnet(m: Any) -> list[Stage] | None:
    names = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")
    methods = ("forward", "forward_features", "forward_head")
    if not (_has(m, names) and _same_methods(m, type(m), methods)):
        return None
    if not isinstance(m.blocks, nn.Sequential) or not hasattr(m, "drop_rate"):
        return None
    stages = [_mod(m, n) for n in names[:-1]]
    if float(m.drop_rate) > 0.0:
        stages.append(_timm_head_dropout(m, "global_pool"))
    stages.append(_mod(m, "classifier"))
    return stages


@_named("timm.models.resnet.ResNet")
def _timm_resnet(m: Any) -> list[Stage] | None:
    names = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    names += ("global_pool", "fc")
    methods = ("forward", "forward_features", "forward_head")
    if not (_has(m, names) and _same_methods(m, type(m), methods)):
        return None
    if not hasattr(m, "drop_rate"):
        return None
    stages = [_mod(m, n) for n in names[:-1]]
    if m.drop_rate:
        stages.append(_timm_head_dropout(m, "global_pool"))
    stages.append(_mod(m, "fc"))
    return stages


@_named("torchvision.models.resnet.ResNet")
def _tv_resnet(m: Any) -> list[Stage] | None:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    names += ("avgpool", "fc")
    if not (_has(m, names) and _same_methods(m, type(m), ("forward", "_forward_impl"))):
        return None
    stages = [_mod(m, n) for n in names[:-1]]
    stages.append(Stage("avgpool#flatten", None, _flatten1))
    stages.append(_mod(m, "fc"))
    return stages


@_named("torchvision.models.mobilenetv2.MobileNetV2")
def _tv_mobilenet_v2(m: Any) -> list[Stage] | None:
    methods = ("forward", "_forward_impl")
    if not (_has(m, ("features", "classifier")) and _same_methods(m, type(m), methods)):
        return None
    return [
        _mod(m, "features"),
        Stage("features#adaptive_avg_pool2d", None, _adaptive_pool_1x1),
        Stage("features#flatten", None, _flatten1),
        _mod(m, "classifier"),
    ]


@_named("torchvision.models.efficientnet.EfficientNet")
def _tv_efficientnet(m: Any) -> list[Stage] | None:
    names = ("features", "avgpool", "classifier")
    if not (_has(m, names) and _same_methods(m, type(m), ("forward", "_forward_impl"))):
        return None
    return [
        _mod(m, "features"),
        _mod(m, "avgpool"),
        Stage("avgpool#flatten", None, _flatten1),
        _mod(m, "classifier"),
    ]
