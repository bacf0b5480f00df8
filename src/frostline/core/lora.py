"""LoRA (low-rank adaptation) as a freezing state, with Keras 3's semantics.

:func:`enable` turns a ``torch.nn`` Linear, Conv1d/2d/3d or Embedding *in place* (the same
object, the same ``weight``) into its LoRA form: the kernel is pinned frozen (it stays
``requires_grad=False`` whatever the ``trainable`` setter says, see
:func:`frostline.core.state.pinned_frozen`), two trainable weights are added, named and
shaped as in Keras (``lora_kernel_a`` ``(in, rank)`` and ``lora_kernel_b`` ``(rank, out)``
for Linear; a conv's ``lora_kernel_a`` is ``(*kernel_size, in/groups, rank)``; an
Embedding's are ``lora_embeddings_a``/``lora_embeddings_b``), and the layer computes with
``kernel + a @ b * (lora_alpha / rank)`` (``lora_alpha`` defaults to ``rank``).
:func:`merge` folds the adapters into the kernel and gives the module its plain class back.

The LoRA classes are subclasses of the torch classes with the same names (``Linear`` is a
``torch.nn.Linear``; ``class_name`` and ``of_type("Linear")`` still see a Linear). Linear
and Embedding add the low-rank path to the output (``(x @ a) @ b``: no full-size kernel or
kernel gradient is made per step); a conv convolves with the merged kernel.

>>> import torch
>>> from torch import nn
>>> lin = nn.Linear(6, 3)
>>> enable(lin, 2)
>>> [n for n, p in lin.named_parameters() if p.requires_grad]
['bias', 'lora_kernel_a', 'lora_kernel_b']
>>> x = torch.randn(4, 6); before = lin(x)
>>> merge(lin); type(lin) is nn.Linear, torch.allclose(lin(x), before)
(True, True)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from frostline.core.state import set_pinned_frozen

__all__ = [
    "INITIALIZERS",
    "LoRALayer",
    "apply_lora_state",
    "enable",
    "is_lora",
    "lora_state",
    "merge",
    "refusal",
    "supported",
    "suspended",
]

Initializer = str | Callable[[Tensor], Any]


# -- initializers (Keras names and formulas; fans as Keras computes them) ------------------
def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _variance_scaling(scale: float, mode: str, distribution: str) -> Callable[[Tensor], Any]:
    def init(t: Tensor) -> None:
        fan_in, fan_out = _fans(tuple(t.shape))
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        var = scale / max(1.0, fan)
        if distribution == "uniform":
            limit = math.sqrt(3.0 * var)
            nn.init.uniform_(t, -limit, limit)
        else:  # Keras' truncated normal: cut at 2 stddev, rescaled to keep the variance
            std = math.sqrt(var) / 0.87962566103423978
            nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std)

    return init


INITIALIZERS: dict[str, Callable[[Tensor], Any]] = {
    "zeros": nn.init.zeros_,
    "ones": nn.init.ones_,
    "he_uniform": _variance_scaling(2.0, "fan_in", "uniform"),
    "he_normal": _variance_scaling(2.0, "fan_in", "normal"),
    "glorot_uniform": _variance_scaling(1.0, "fan_avg", "uniform"),
    "glorot_normal": _variance_scaling(1.0, "fan_avg", "normal"),
    "lecun_uniform": _variance_scaling(1.0, "fan_in", "uniform"),
    "lecun_normal": _variance_scaling(1.0, "fan_in", "normal"),
}


def _initializer(spec: Initializer, what: str) -> Callable[[Tensor], Any]:
    if isinstance(spec, str):
        if spec not in INITIALIZERS:
            raise ValueError(
                f"{what} must be one of {', '.join(INITIALIZERS)} or a callable that fills a "
                f"tensor in place (torch.nn.init style), got {spec!r}"
            )
        return INITIALIZERS[spec]
    if callable(spec):
        return spec
    raise TypeError(
        f"{what} must be an initializer name or a callable, got {type(spec).__name__}: {spec!r}"
    )


# -- the LoRA classes ----------------------------------------------------------------------
class LoRALayer:
    """What every LoRA class adds to its torch class: rank, alpha, the adapters and the delta."""

    lora_rank: int
    lora_alpha: float
    _lora_names: tuple[str, str] = ("lora_kernel_a", "lora_kernel_b")
    _lora_base: type[nn.Module]

    @property
    def lora_scale(self) -> float:
        """``lora_alpha / lora_rank``."""
        return self.lora_alpha / self.lora_rank

    def lora_weights(self) -> tuple[Tensor, Tensor]:
        """``(a, b)``: the two trainable low-rank factors."""
        a, b = self._lora_names
        return getattr(self, a), getattr(self, b)

    def lora_delta(self) -> Tensor:
        """``a @ b * scale`` laid out as the torch kernel (``weight``), in its dtype."""
        a, b = self.lora_weights()
        delta = torch.matmul(a, b) * self.lora_scale
        n = delta.dim()
        if n > 2 or isinstance(self, nn.Linear):  # Keras (..., in, out) -> torch (out, in, ...)
            delta = delta.permute(n - 1, n - 2, *range(n - 2))
        weight: Tensor = self.weight  # type: ignore[attr-defined]
        return delta.to(weight.dtype)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}"


class Linear(LoRALayer, nn.Linear):
    """``torch.nn.Linear`` with LoRA enabled (made by :func:`enable`, never built directly)."""

    _lora_base = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        y = F.linear(input, self.weight, self.bias)
        a, b = self.lora_weights()
        x = input if input.dtype == a.dtype else input.to(a.dtype)
        low = torch.matmul(torch.matmul(x, a), b) * self.lora_scale
        return y + low.to(y.dtype)


class Embedding(LoRALayer, nn.Embedding):
    """``torch.nn.Embedding`` with LoRA enabled (adapters ``lora_embeddings_a``/``_b``)."""

    _lora_base = nn.Embedding
    _lora_names = ("lora_embeddings_a", "lora_embeddings_b")

    def forward(self, input: Tensor) -> Tensor:
        y = F.embedding(
            input, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse
        )
        a, b = self.lora_weights()
        rows = F.embedding(input, a, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)
        low = torch.matmul(rows, b) * self.lora_scale
        return y + low.to(y.dtype)


class _Conv(LoRALayer):
    def forward(self, input: Tensor) -> Tensor:
        weight: Tensor = self.weight  # type: ignore[attr-defined]
        return self._conv_forward(input, weight + self.lora_delta(), self.bias)  # type: ignore[attr-defined]


class Conv1d(_Conv, nn.Conv1d):
    """``torch.nn.Conv1d`` with LoRA enabled."""

    _lora_base = nn.Conv1d


class Conv2d(_Conv, nn.Conv2d):
    """``torch.nn.Conv2d`` with LoRA enabled."""

    _lora_base = nn.Conv2d


class Conv3d(_Conv, nn.Conv3d):
    """``torch.nn.Conv3d`` with LoRA enabled."""

    _lora_base = nn.Conv3d


_LORA_CLASS: dict[type, type] = {
    nn.Linear: Linear,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.Embedding: Embedding,
}


def refusal(module: nn.Module) -> str | None:
    """Why :func:`enable` refuses ``module`` (None when it takes it).

    It takes exactly a torch Linear, Conv1d/2d/3d or Embedding, built, without LoRA. A
    subclass is refused (its forward may read the weight another way: MultiheadAttention
    reads its ``out_proj`` weight directly).

    >>> refusal(nn.Linear(2, 2)) is None, refusal(nn.LayerNorm(2))
    (True, 'not a Linear, Conv1d/2d/3d or Embedding but torch.nn.modules.normalization.LayerNorm')
    """
    if is_lora(module):
        return "LoRA is already enabled (once per layer)"
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "not built yet (run one batch through it first)"
    if type(module) not in _LORA_CLASS:
        cls = type(module)
        return f"not a Linear, Conv1d/2d/3d or Embedding but {cls.__module__}.{cls.__qualname__}"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "an Embedding with max_norm (it renormalises its weight in place)"
    return None


def supported(module: nn.Module) -> bool:
    """Whether :func:`enable` takes ``module`` (see :func:`refusal`).

    >>> supported(nn.Linear(2, 2)), supported(nn.LayerNorm(2))
    (True, False)
    """
    return refusal(module) is None


def is_lora(module: nn.Module) -> bool:
    """Whether LoRA is enabled on ``module``.

    >>> is_lora(nn.Linear(2, 2))
    False
    """
    return isinstance(module, LoRALayer)


def _shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(module, nn.Linear):
        return (module.in_features, rank), (rank, module.out_features)
    if isinstance(module, nn.Embedding):
        return (module.num_embeddings, rank), (rank, module.embedding_dim)
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    k = tuple(module.kernel_size)
    return (*k, module.in_channels // module.groups, rank), (rank, module.out_channels)


def _check_number(value: object, what: str, *, integer: bool) -> None:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    number = isinstance(value, kinds) and not isinstance(value, bool)
    if not number or not float(value) > 0:  # type: ignore[arg-type]
        expected = "a positive int" if integer else "a positive number"
        raise ValueError(f"{what} must be {expected}, got {value!r}")
    if not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"{what} must be finite, got {value!r}")


def enable(
    module: nn.Module,
    rank: int,
    lora_alpha: float | None = None,
    a_initializer: Initializer = "he_uniform",
    b_initializer: Initializer = "zeros",
    *,
    where: str = "",
) -> None:
    """Enable LoRA on ``module`` in place (see the module docstring).

    The adapters train (``requires_grad=True``, even in a frozen model: enabling LoRA is
    asking for them to train); the kernel is pinned frozen until :func:`merge`.

    >>> conv = nn.Conv2d(3, 8, 3); enable(conv, 4, lora_alpha=8)
    >>> tuple(conv.lora_kernel_a.shape), tuple(conv.lora_kernel_b.shape), conv.lora_scale
    ((3, 3, 3, 4), (4, 8), 2.0)
    """
    why = refusal(module)
    if why is not None:
        raise (ValueError if is_lora(module) else TypeError)(
            f"cannot enable LoRA on {where or type(module).__name__}: {why}"
        )
    _check_number(rank, "rank", integer=True)
    alpha = rank if lora_alpha is None else lora_alpha
    _check_number(alpha, "lora_alpha", integer=False)
    init_a = _initializer(a_initializer, "a_initializer")
    init_b = _initializer(b_initializer, "b_initializer")
    weight = module.weight
    assert isinstance(weight, Tensor)  # refusal() passed: a torch layer's weight
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    shape_a, shape_b = _shapes(module, rank)
    a = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=weight.device))
    b = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=weight.device))
    with torch.no_grad():
        init_a(a)
        init_b(b)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            a[module.padding_idx].zero_()  # the padding row stays constant, as in torch
    cls: Any = _LORA_CLASS[type(module)]
    module.__class__ = cls
    names = cls._lora_names
    module.register_parameter(names[0], a)
    module.register_parameter(names[1], b)
    module.__dict__["lora_rank"] = rank
    module.__dict__["lora_alpha"] = alpha
    set_pinned_frozen(weight, True)
    weight.requires_grad_(False)
    weight.grad = None


def merge(module: nn.Module) -> None:
    """Fold the adapters into the kernel and give ``module`` its torch class back.

    The kernel (the same tensor) stays frozen; the adapters are removed.

    >>> lin = nn.Linear(2, 2); enable(lin, 1); merge(lin)
    >>> type(lin).__name__, lin.weight.requires_grad, hasattr(lin, "lora_kernel_a")
    ('Linear', False, False)
    """
    if not isinstance(module, LoRALayer):
        raise ValueError(f"LoRA is not enabled on this {type(module).__name__}")
    assert isinstance(module, nn.Module)
    weight: Tensor = module.weight  # type: ignore[assignment]
    with torch.no_grad():
        weight.add_(module.lora_delta())
    _strip(module)
    set_pinned_frozen(weight, False)


def _strip(module: nn.Module) -> dict[str, Any]:
    """Remove the LoRA state from ``module`` (class, adapters, rank, alpha); returns it."""
    cls = type(module)
    stash: dict[str, Any] = {"class": cls}
    for n in cls._lora_names:  # type: ignore[attr-defined]
        stash[n] = module._parameters.pop(n)
    for k in ("lora_rank", "lora_alpha"):
        stash[k] = module.__dict__.pop(k)
    module.__class__ = cls._lora_base  # type: ignore[attr-defined]
    return stash


def _restore(module: nn.Module, stash: dict[str, Any]) -> None:
    module.__class__ = stash["class"]
    for n in stash["class"]._lora_names:
        module._parameters[n] = stash[n]
    for k in ("lora_rank", "lora_alpha"):
        module.__dict__[k] = stash[k]


@contextlib.contextmanager
def suspended(root: nn.Module) -> Iterator[None]:
    """Inside the block, every LoRA layer under ``root`` is its plain torch layer (no
    adapters in the module tree or state dict): how an architecture is read back.

    >>> net = nn.Sequential(nn.Linear(2, 2)); enable(net[0], 1)
    >>> with suspended(net):
    ...     sorted(net.state_dict())
    ['0.bias', '0.weight']
    >>> is_lora(net[0])
    True
    """
    stashes = [(m, _strip(m)) for m in root.modules() if is_lora(m)]
    try:
        yield
    finally:
        for m, stash in stashes:
            _restore(m, stash)


# -- the state as data ---------------------------------------------------------------------
def lora_state(root: nn.Module) -> dict[str, dict[str, float]]:
    """``{path: {"rank": r, "alpha": a}}`` for every LoRA layer under ``root``.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)); enable(net[1], 2)
    >>> lora_state(net)
    {'1': {'rank': 2, 'alpha': 2}}
    """
    return {
        path: {"rank": m.lora_rank, "alpha": m.lora_alpha}
        for path, m in root.named_modules()
        if isinstance(m, LoRALayer)
    }


def apply_lora_state(root: nn.Module, state: dict[str, Any] | None) -> None:
    """Enable LoRA where :func:`lora_state` recorded it (adapters zero, to be loaded next).

    A layer already LoRA-enabled must have the recorded rank and alpha; a path the model
    lacks raises ``KeyError`` naming it.

    >>> net = nn.Sequential(nn.Linear(2, 2)); apply_lora_state(net, {"0": {"rank": 1, "alpha": 1}})
    >>> is_lora(net[0]), float(net[0].lora_kernel_a.detach().abs().sum())
    (True, 0.0)
    """
    if not state:
        return
    modules = dict(root.named_modules())
    unknown = [p for p in state if p not in modules]
    if unknown:
        raise KeyError(
            f"the saved LoRA state names layers this model does not have: {unknown[:10]}"
        )
    for path, record in state.items():
        m = modules[path]
        rank, alpha = record.get("rank"), record.get("alpha")
        if isinstance(m, LoRALayer):
            if (m.lora_rank, m.lora_alpha) != (rank, alpha):
                raise ValueError(
                    f"{path!r} has LoRA rank {m.lora_rank}, alpha {m.lora_alpha:g}; the saved "
                    f"state has rank {rank}, alpha {alpha}"
                )
            continue
        enable(m, rank, alpha, "zeros", "zeros", where=repr(path))  # type: ignore[arg-type]
