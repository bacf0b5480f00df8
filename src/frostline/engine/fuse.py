"""Inference-optimised view of a frozen run of modules (Conv2d+BatchNorm folding).

:func:`inference_copy` copies the modules' structure but shares every parameter and buffer
with them (it holds no copy of any weight), replaces every Conv2d whose output directly and
exclusively feeds a BatchNorm by a conv that folds that BatchNorm in at each call, runs in
``channels_last``, and checks the result numerically against the unfused modules. If
anything is off it returns ``None`` and the caller runs the plain modules. Each pair's
folded weight is also checked, against the conv followed by the BatchNorm on two samples
of the batch, the first time the pair folds; a pair that fails runs unfolded from then on.

The folded weight is computed from the live tensors at every call (one layer at a time, a
transient the size of that layer's weight; the per-channel scale is O(channels)), so a
change of the original weights or running statistics, even through ``p.data.copy_``, is
seen by the next call. Folding a weight costs about one pass over it and saves one pass
over the conv's output, so a conv folds only when its weight is no larger than its output
for the batch at hand; otherwise it runs the conv and then the BatchNorm. A conv with
TensorFlow's 'same' padding (timm's ``Conv2dSame``) pads into a buffer kept between calls
and shared by the copy's convs, never into a fresh tensor (:class:`PadBuffer`).

Conv->BN pairs are found in forward order with ``torch.fx`` symbolic tracing; where a
module cannot be traced, a per-class table (plain ``nn.Sequential`` including torchvision's
``Conv2dNormActivation``, timm's efficientnet blocks and resnet blocks) is used and its
children are searched in turn.

Both folding and ``channels_last`` pay on CPU: for timm ``mobilenetv2_100`` (96x96,
batch 64, 1 thread) channels_last alone saves ~30% and folding + channels_last is ~2x faster
than the plain eval modules, so both are on by default.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn import functional as F

from frostline.engine.frozen import module_at, timm_no_trace
from frostline.engine.padding import PadBuffer, same_padding
from frostline.engine.rng import capture

__all__ = [
    "AsSet",
    "FoldedConvBn",
    "InferenceCopy",
    "PadBuffer",
    "fold_batchnorm",
    "inference_copy",
    "replay_draws",
    "same_padding",
]


@functools.cache
def _import_timm_specials() -> tuple[Any, Any]:
    bn_act: Any
    try:
        bn_act = importlib.import_module("timm.layers.norm_act").BatchNormAct2d
    except (ImportError, AttributeError):  # pragma: no cover
        bn_act = None
    try:
        conv_same = importlib.import_module("timm.layers.conv2d_same").Conv2dSame
    except (ImportError, AttributeError):  # pragma: no cover
        conv_same = None
    return bn_act, conv_same


def _timm_specials() -> tuple[Any, Any]:
    """timm's BatchNormAct2d and Conv2dSame (``None`` without timm).

    A model can hold timm classes only once timm is imported, so timm is never imported
    here (``import frostline`` stays free of timm and what timm imports).
    """
    return _import_timm_specials() if "timm" in sys.modules else (None, None)


class InferenceCopy(nn.Module):
    """Eval-only wrapper around a fused copy; see :func:`inference_copy`.

    ``body`` is the fused module, ``folded`` lists the folded ``(conv, bn)`` paths inside
    it. ``train()`` is ignored: the copy always runs in inference form, without autograd.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = InferenceCopy(nn.Identity(), channels_last=False)
        >>> m.train().training
        False
    """

    def __init__(
        self, body: nn.Module, *, channels_last: bool, folded: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__()
        self.body = body
        self.channels_last = channels_last
        self.folded = list(folded)
        super().train(False)

    def train(self, mode: bool = True) -> InferenceCopy:
        """Ignored (stays in eval mode)."""
        return self

    def pad_buffers(self) -> list[PadBuffer]:
        """The padding buffers of the copy's folded convs ('same'-padded ones), each once.

        Example:
            >>> from torch import nn
            >>> InferenceCopy(nn.Identity(), channels_last=False).pad_buffers()
            []
        """
        found: dict[int, PadBuffer] = {}
        for m in self.body.modules():
            if isinstance(m, FoldedConvBn):
                found.setdefault(id(m.pad_buffer), m.pad_buffer)
        return list(found.values())

    def release(self) -> None:
        """Free what the copy keeps between calls for speed (its padding buffers); the
        next call allocates it again. Call it when the copy will not run for a while.

        Example:
            >>> from torch import nn
            >>> InferenceCopy(nn.Identity(), channels_last=False).release()
        """
        for buf in self.pad_buffers():
            buf.release()

    @torch.no_grad()
    def forward(self, *xs: Tensor) -> Any:
        if self.channels_last:
            xs = tuple(
                x.contiguous(memory_format=torch.channels_last)
                if isinstance(x, Tensor) and x.dim() == 4
                else x
                for x in xs
            )
        y = self.body(*xs)
        if isinstance(y, tuple):
            return tuple(t.contiguous() if isinstance(t, Tensor) else t for t in y)
        return y.contiguous() if isinstance(y, Tensor) else y


def inference_copy(
    modules: Sequence[nn.Module] | nn.Module,
    *,
    example: Tensor | tuple[Tensor, ...],
    channels_last: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    reference: Tensor | tuple[Tensor, ...] | None = None,
    as_set: Collection[nn.Module] = (),
) -> InferenceCopy | None:
    """A verified, eval-mode, BN-folded copy of ``modules`` applied in order, sharing weights.

    The module structure is copied; every parameter and buffer is the original tensor (no
    weight is copied). Each BatchNorm2d fed only by a Conv2d is folded into the conv at each
    call (see the module docstring) and replaced by ``nn.Identity`` (timm
    ``BatchNormAct2d``: by its drop+act part). The copy runs under ``torch.no_grad``; with
    ``channels_last`` the input and the folded weights are channels_last and the output is
    returned contiguous (NCHW). The copy is checked on ``example`` against the unfused
    modules in eval mode, as it will run; ``None`` if it differs by more than
    ``rtol``/``atol`` or does not produce a tensor. A pair's folding is checked the first
    time it folds (:class:`FoldedConvBn`): a pair not folded at the example's size (its
    weight larger than its output) gets no full-size folded weight made just to check it.
    ``modules`` are never modified. The layers in ``as_set`` (submodules of ``modules``
    that draw random numbers) run in the copy as they are set, in their own modes, on
    contiguous inputs (a channels_last input would change where each draw lands): the
    copy draws what the plain modules draw, and the layers around them still fold.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> prefix = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()]
        >>> fast = inference_copy(prefix, example=torch.randn(2, 3, 16, 16))
        >>> fast.folded
        [('0', '1')]
        >>> type(fast.body[1]).__name__
        'Identity'
        >>> fast.body[0].conv.weight is prefix[0].weight  # shared, not copied
        True
    """
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not all(isinstance(m, nn.Module) for m in mods):
        raise TypeError(
            "inference_copy expects an nn.Module or a sequence of nn.Modules, got "
            + ", ".join(sorted({type(m).__name__ for m in mods if not isinstance(m, nn.Module)}))
        )
    args = tuple(example) if isinstance(example, tuple) else (example,)
    memo: dict[int, nn.Module] = {}
    body: nn.Module = _share_copy(mods[0] if len(mods) == 1 else nn.Sequential(*mods), memo)
    body.eval()
    _keep_as_set(body, as_set, memo)
    ref = reference
    if ref is None:
        try:
            with torch.no_grad():
                ref = body(*(a.clone() for a in args))
        except Exception:
            return None
    if not _tensors(ref):
        return None

    try:
        folded = _fuse_in_place(body, channels_last, rtol=rtol, atol=atol)
        out_mod = InferenceCopy(body, channels_last=channels_last, folded=folded)
        out = out_mod(*(a.clone() for a in args))
    except Exception:
        return None
    if not _close(out, ref, rtol, atol):
        return None
    return out_mod


class AsSet(nn.Module):
    """A layer that draws random numbers, inside an :class:`InferenceCopy`: it runs in its
    own modes on contiguous inputs, and hands back a 4-d output in its input's memory
    format.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> torch.manual_seed(0); a = nn.Dropout()(x.contiguous())  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> torch.manual_seed(0); b = AsSet(nn.Dropout())(x)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> torch.equal(a, b), b.is_contiguous(memory_format=torch.channels_last)
        (True, True)
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def train(self, mode: bool = True) -> AsSet:
        """Ignored: the layer keeps the modes it was set to."""
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        last = any(_channels_last(a) for a in args)
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        out = self.layer(*args, **kwargs)
        if last and isinstance(out, Tensor) and out.dim() == 4:
            return out.contiguous(memory_format=torch.channels_last)
        return out


def _channels_last(a: Any) -> bool:
    return (
        isinstance(a, Tensor)
        and a.dim() == 4
        and not a.is_contiguous()
        and a.is_contiguous(memory_format=torch.channels_last)
    )


def _keep_as_set(
    body: nn.Module, layers: Collection[nn.Module], memo: dict[int, nn.Module]
) -> None:
    """In the eval-mode copy ``body`` (``memo``: original module id -> its copy), give
    each of ``layers`` its original modes back and wrap it in :class:`AsSet`."""
    copies = {id(memo[id(m)]): m for m in layers if id(m) in memo}
    if not copies:
        return
    named = dict(body.named_modules())
    for path, c in list(named.items()):
        original = copies.get(id(c))
        if original is None or not path:
            continue
        for o, k in zip(original.modules(), c.modules()):
            k.training = o.training
        _set(body, path, AsSet(c), named)


@contextlib.contextmanager
def replay_draws(generators: Iterable[Any] = ()) -> Iterator[Callable[[], None]]:
    """Run code twice on the same random numbers, and leave every generator as it was.

    Yields ``again()``, which puts every generator :mod:`frostline.engine.rng` watches
    (torch's default ones, Python's ``random``, NumPy's global RNG, and ``generators``,
    e.g. those a model holds: :func:`~frostline.engine.rng.generators_of`) back to its
    state at entry; on exit they are put back once more, so what ran inside consumed no
    randomness of the caller's. A frozen part that draws random numbers (augmentation in
    front of a frozen base) is checked this way: the plain run and the folded copy see
    the same draws.

    >>> import torch
    >>> with replay_draws() as again:
    ...     a = torch.rand(3)
    ...     again()
    ...     b = torch.rand(3)
    >>> torch.equal(a, b)
    True
    """
    state = capture(generators)
    try:
        yield state.restore
    finally:
        state.restore()


def _share_copy(m: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of the module tree of ``m`` whose parameters and buffers are ``m``'s own tensors.

    Each module is copied shallowly, with its own child, parameter and buffer tables and
    its own ``training`` flag, so replacing a child or switching modes in the copy never
    reaches ``m``; everything else (a graph module's graph and code, a layer's settings)
    is shared, not deep-copied: a RegNet's phase-2 ``fit`` takes 0.54 s instead of 0.74 s.
    """
    memo = {} if memo is None else memo
    if id(m) in memo:  # a module used twice stays one module
        return memo[id(m)]
    if isinstance(m, fx.GraphModule):
        # GraphModule.__copy__ generates and compiles its code again (a third of a
        # ConvNeXt's inference_copy); the copy shares the graph, the code and the class
        # that holds the compiled forward instead (nothing here changes a graph)
        new: nn.Module = object.__new__(type(m))
        new.__dict__.update(m.__dict__)
    else:
        new = copy.copy(m)
    memo[id(m)] = new
    new.__dict__["_parameters"] = dict(m._parameters)
    new.__dict__["_buffers"] = dict(m._buffers)
    new.__dict__["_modules"] = {
        k: None if c is None else _share_copy(c, memo) for k, c in m._modules.items()
    }
    return new


def _tensors(y: Any) -> bool:
    """A tensor, or a tuple of tensors (a graph's frontier)."""
    return isinstance(y, Tensor) or (
        isinstance(y, tuple) and bool(y) and all(isinstance(t, Tensor) for t in y)
    )


def _close(out: Any, ref: Any, rtol: float, atol: float) -> bool:
    if isinstance(ref, tuple):
        return (
            isinstance(out, tuple)
            and len(out) == len(ref)
            and all(_close(a, b, rtol, atol) for a, b in zip(out, ref))
        )
    if not isinstance(out, Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    if not ref.is_floating_point():
        return bool(torch.equal(out, ref))
    return bool(torch.allclose(out, ref, rtol=rtol, atol=atol))


# --------------------------------------------------------------------------- folding


def _is_foldable_conv(m: nn.Module) -> bool:
    if not isinstance(m, nn.Conv2d):
        return False
    conv_same = _timm_specials()[1]
    return type(m).forward is nn.Conv2d.forward or (conv_same is not None and type(m) is conv_same)


def _is_foldable_bn(m: nn.Module) -> bool:
    if not isinstance(m, nn.BatchNorm2d) or m.running_mean is None or m.running_var is None:
        return False
    if type(m).forward is nn.BatchNorm2d.forward:
        return True
    bn_act = _timm_specials()[0]
    return bn_act is not None and type(m) is bn_act


def _scale_shift(
    conv_b: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gamma: Tensor | None,
    beta: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``bn(conv(x)) == conv(x, w * scale, shift)`` (per output channel; float32 or wider)."""
    d = torch.promote_types(var.dtype, torch.float32)
    scale = torch.rsqrt(var.to(d) + eps)
    if gamma is not None:
        scale = scale * gamma.to(d)
    b = -mean.to(d) if conv_b is None else conv_b.to(d) - mean.to(d)
    shift = b * scale if beta is None else torch.addcmul(beta.to(d), b, scale)
    return scale, shift


class FoldedConvBn(nn.Module):
    """``bn(conv(x))`` in eval mode, the BN folded into the conv's weight at each call.

    Nothing derived from ``conv`` and ``bn`` (whose tensors :func:`inference_copy` shares
    with the user's modules) is kept between calls: each call reads their current weights
    and running statistics. The folded weight (``channels_last`` if asked) is built only
    when it is no larger than the conv's output, or always with ``always_fold``; otherwise
    the call runs the conv and then the BatchNorm. The first call that folds checks the
    folded conv against conv then BatchNorm on two samples of its input (``rtol``/``atol``,
    ``fold_checked``); if they differ the pair never folds again (``fold_ok`` false) and
    runs unfolded, so a wrong fold never reaches an output.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
        >>> fused = FoldedConvBn(conv, bn, channels_last=False)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> with torch.no_grad():
        ...     bool(torch.allclose(fused(x), bn(conv(x)), atol=1e-6))
        True
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        *,
        channels_last: bool,
        rtol: float = 1e-3,
        atol: float = 1e-4,
    ) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.same = type(conv) is not nn.Conv2d and type(conv) is _timm_specials()[1]
        self.always_fold = False
        self.rtol, self.atol = rtol, atol
        self.fold_checked = False  # the folded conv was compared with conv then BN once
        self.fold_ok = True  # false once that comparison failed: never folds again
        self.pad_buffer = PadBuffer()  # where 'same' padding pads (see _pad_same)

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        c = self.conv
        if self.same:
            x = self._pad_same(x, (int(w.shape[-2]), int(w.shape[-1])))
            return F.conv2d(x, w, b, c.stride, 0, c.dilation, c.groups)
        return c._conv_forward(x, w, b)

    def _pad_same(self, x: Tensor, kernel: tuple[int, int]) -> Tensor:
        """``x`` zero-padded as timm's ``pad_same`` does (TF 'SAME'), in ``x``'s layout.

        Without autograd the padded tensor is a view of ``pad_buffer`` (kept between calls
        and shared by the pairs of one :func:`inference_copy`), so a call copies ``x``
        once and allocates nothing; with autograd (which may keep the input) it is new.
        """
        c = self.conv
        (top, bottom), (left, right) = (
            same_padding(int(x.shape[i - 2]), kernel[i], c.stride[i], c.dilation[i]) for i in (0, 1)
        )
        if not (top or bottom or left or right):
            return x
        if x.dim() != 4 or torch.is_grad_enabled():
            return F.pad(x, (left, right, top, bottom))
        return self.pad_buffer.pad(x, top, bottom, left, right)

    def _worth_folding(self, x: Tensor) -> bool:
        """Folding reads and writes the weight once and saves a pass over the output."""
        if x.dim() != 4:
            return True
        c = self.conv
        out = x.shape[0] * c.out_channels * x.shape[2] * x.shape[3]
        return c.weight.numel() <= out // (c.stride[0] * c.stride[1])

    def _unfolded(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        w = conv.weight
        if x.dim() == 4 and not w.is_contiguous(memory_format=torch.channels_last):
            # a channels_last input would make the conv copy the whole weight to
            # channels_last at every call (ResNet-18's layer4: 9 MB each): run it in
            # the weight's layout (not folding means its output is the smaller)
            x = x.contiguous()
        y = self._conv(x, w, conv.bias)
        return F.batch_norm(
            y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        mean, var = bn.running_mean, bn.running_var
        assert mean is not None and var is not None  # _is_foldable_bn
        w = conv.weight
        if not self.fold_ok or not (self.always_fold or self._worth_folding(x)):
            return self._unfolded(x)
        scale, shift = _scale_shift(conv.bias, mean, var, bn.eps, bn.weight, bn.bias)
        # a new tensor, never ``w`` itself (copy, then scale in place: 2x faster than mul(out=))
        folded = torch.empty_like(w, memory_format=self.memory_format).copy_(w)
        folded.mul_(scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
        b = shift.to(w.dtype)
        if not self.fold_checked:
            self.fold_checked = True
            probe = x[:2]
            if not _close(
                self._conv(probe, folded, b), self._unfolded(probe), self.rtol, self.atol
            ):
                self.fold_ok = False
                del folded
                return self._unfolded(x)
        return self._conv(x, folded, b)


def _bn_replacement(bn: nn.Module) -> nn.Module:
    bn_act = _timm_specials()[0]
    if bn_act is not None and isinstance(bn, bn_act):
        parts = [p for p in (bn.drop, bn.act) if not isinstance(p, nn.Identity)]
        if parts:
            return nn.Sequential(*parts).eval()
    return nn.Identity()


def _set(root: nn.Module, path: str, m: nn.Module, named: dict[str, nn.Module]) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(module_at(named, root, parent_path), attr, m)


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        self.timm_leaves, autowrap = timm_no_trace()
        super().__init__(autowrap_functions=autowrap)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            return True
        if self.timm_leaves and isinstance(m, self.timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(m: nn.Module) -> fx.Graph:
    return _Tracer().trace(m)


def _graph_pairs(
    root: nn.Module, graph: fx.Graph, named: dict[str, nn.Module] | None = None
) -> list[tuple[str, str]]:
    named = dict(root.named_modules()) if named is None else named
    calls: dict[int, int] = {}
    attrs: list[str] = []
    for n in graph.nodes:
        if n.op == "call_module":
            mid = id(module_at(named, root, str(n.target)))
            calls[mid] = calls.get(mid, 0) + 1
        elif n.op == "get_attr":
            attrs.append(str(n.target))
    pairs = []
    for n in graph.nodes:
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs:
            continue
        src = n.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = module_at(named, root, str(src.target))
        bn = module_at(named, root, str(n.target))
        if not (_is_foldable_conv(conv) and _is_foldable_bn(bn)):
            continue
        if calls[id(conv)] != 1 or calls[id(bn)] != 1:
            continue
        if any(a.startswith((f"{src.target}.", f"{n.target}.")) for a in attrs):
            continue
        pairs.append((str(src.target), str(n.target)))
    return pairs


def _table() -> dict[type, tuple[tuple[str, str], ...]]:
    table: dict[type, tuple[tuple[str, str], ...]] = {}
    try:
        from timm.models import _efficientnet_blocks as eb
        from timm.models import resnet as tr

        s2d = ("conv_s2d", "bn_s2d")
        table[eb.ConvBnAct] = (("conv", "bn1"),)
        table[eb.DepthwiseSeparableConv] = (s2d, ("conv_dw", "bn1"), ("conv_pw", "bn2"))
        table[eb.InvertedResidual] = (
            s2d,
            ("conv_pw", "bn1"),
            ("conv_dw", "bn2"),
            ("conv_pwl", "bn3"),
        )
        table[eb.EdgeResidual] = (("conv_exp", "bn1"), ("conv_pwl", "bn2"))
        table[tr.BasicBlock] = (("conv1", "bn1"), ("conv2", "bn2"))
        table[tr.Bottleneck] = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    except ImportError:  # pragma: no cover
        pass
    return table


def _table_pairs(m: nn.Module) -> list[tuple[str, str]]:
    """Pairs known from the source of ``type(m).forward`` (used when fx fails)."""
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        names = list(m._modules)
        return [(a, b) for a, b in zip(names, names[1:])]
    for cls, pairs in _table().items():
        if type(m) is cls and type(m).forward is cls.forward:
            return [p for p in pairs if getattr(m, p[0], None) is not None]
    return []


def _find_pairs(
    m: nn.Module, prefix: str = "", named: dict[str, nn.Module] | None = None
) -> list[tuple[str, str]]:
    try:
        # a graph module (the frozen part of a partition) already is its graph: reading it
        # costs nothing, tracing it again ~0.3 s for a RegNet
        graph = m.graph if isinstance(m, fx.GraphModule) else _trace(m)
        return [(prefix + c, prefix + b) for c, b in _graph_pairs(m, graph, named)]
    except Exception:
        pass
    pairs = [(prefix + c, prefix + b) for c, b in _table_pairs(m)]
    for name, child in m.named_children():
        if child is not None and not isinstance(child, (nn.Conv2d, nn.BatchNorm2d)):
            pairs += _find_pairs(child, f"{prefix}{name}.")
    return pairs


def _foldable_pairs(
    root: nn.Module,
) -> Iterator[tuple[str, str, nn.Conv2d, nn.BatchNorm2d, dict[str, nn.Module]]]:
    """Each conv->BN pair of ``root`` that folds, as ``(conv path, bn path, conv, bn, named)``:
    paths found in forward order, each module once and not shared; the caller replaces them
    (``named`` is the path table to replace them through)."""
    counts: dict[int, int] = {}
    named: dict[str, nn.Module] = {}
    for path, m in root.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
        named.setdefault(path, m)
    seen: set[int] = set()
    for conv_path, bn_path in _find_pairs(root, named=named):
        try:  # (a path replaced below still names the module it held: never paired twice)
            conv, bn = module_at(named, root, conv_path), module_at(named, root, bn_path)
        except AttributeError:
            continue
        if not (_is_foldable_conv(conv) and _is_foldable_bn(bn)):
            continue
        if conv.out_channels != bn.num_features or {id(conv), id(bn)} & seen:
            continue
        if counts[id(conv)] != 1 or counts[id(bn)] != 1:  # shared modules: leave alone
            continue
        seen |= {id(conv), id(bn)}
        yield conv_path, bn_path, cast(nn.Conv2d, conv), cast(nn.BatchNorm2d, bn), named


def _fuse_in_place(
    root: nn.Module, channels_last: bool, *, rtol: float = 1e-3, atol: float = 1e-4
) -> list[tuple[str, str]]:
    """Fold every conv->BN pair of ``root`` (an eval-mode copy); returns the folded paths."""
    done = []
    pad_buffer = PadBuffer()  # the pairs run one at a time: one buffer serves them all
    for conv_path, bn_path, conv, bn, named in _foldable_pairs(root):
        _set(root, bn_path, _bn_replacement(bn), named)
        pair = FoldedConvBn(conv, bn, channels_last=channels_last, rtol=rtol, atol=atol)
        pair.pad_buffer = pad_buffer
        _set(root, conv_path, pair, named)
        done.append((conv_path, bn_path))
    return done


def fold_batchnorm(root: nn.Module) -> list[tuple[str, str]]:
    """Fold each BatchNorm2d fed only by a Conv2d into that conv's weight and bias, in place,
    for a module that will only run in inference (an exported copy): the conv gets new,
    frozen ``weight``/``bias`` tensors (``root``'s old ones are not written), the BatchNorm
    is replaced by ``nn.Identity`` (timm ``BatchNormAct2d``: by its drop+act part). Returns
    the folded ``(conv, bn)`` paths.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> x = torch.randn(2, 3, 8, 8); ref = net(x)
        >>> fold_batchnorm(net), type(net[1]).__name__
        ([('0', '1')], 'Identity')
        >>> bool(torch.allclose(net(x), ref, atol=1e-5))
        True
    """
    done = []
    for conv_path, bn_path, conv, bn, named in _foldable_pairs(root):
        mean, var = bn.running_mean, bn.running_var
        assert mean is not None and var is not None  # _is_foldable_bn
        with torch.no_grad():
            scale, shift = _scale_shift(conv.bias, mean, var, bn.eps, bn.weight, bn.bias)
            w = conv.weight
            folded = (w.to(scale.dtype) * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        conv.weight = nn.Parameter(folded, requires_grad=False)
        conv.bias = nn.Parameter(shift.to(w.dtype), requires_grad=False)
        _set(root, bn_path, _bn_replacement(bn), named)
        done.append((conv_path, bn_path))
    return done
