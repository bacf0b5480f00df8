"""Tests for frostline.engine.fuse: verified Conv2d+BatchNorm folded inference copies."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import frostline.engine.fuse as fuse
from frostline.engine.fuse import FoldedConvBn, InferenceCopy, inference_copy

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _calibrated(model: nn.Module) -> nn.Module:
    """Non-trivial BN affine params and running stats (as after training), eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.momentum = None  # cumulative average over the calibration pass
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64, generator=g))
    return model.eval()


@functools.cache
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("tv_"):
        return _calibrated(getattr(torchvision.models, name[3:])(num_classes=10))
    return _calibrated(timm.create_model(name, num_classes=10))


def _prefix(model: nn.Module) -> list[nn.Module]:
    """The children before global pooling (the typical frozen part of a convnet)."""
    out = []
    for name, child in model.named_children():
        if name in ("global_pool", "avgpool", "classifier", "fc", "head"):
            break
        out.append(child)
    assert out
    return out


def _snapshot(mods: list[nn.Module]) -> list[tuple[dict[str, Tensor], list[bool], list[bool]]]:
    return [
        (
            {k: v.clone() for k, v in m.state_dict().items()},
            [s.training for s in m.modules()],
            [p.requires_grad for p in m.parameters()],
        )
        for m in mods
    ]


def _run(mods: list[nn.Module], x: Tensor) -> Tensor:
    with torch.no_grad():
        for m in mods:
            x = m(x)
    return x


@pytest.mark.parametrize(
    "name", ["mobilenetv2_100", "efficientnet_lite0", "resnet18", "tv_resnet18", "tv_mobilenet_v2"]
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_prefix_matches(name: str, channels_last: bool) -> None:
    prefix = _prefix(_model(name))
    for m in prefix:
        m.train()  # a frozen prefix may sit in a model in train mode
    before = _snapshot(prefix)
    x = X.clone()
    fused = inference_copy(prefix, example=x, channels_last=channels_last)
    assert isinstance(fused, InferenceCopy)
    assert torch.equal(x, X)

    # originals untouched, bitwise
    for (sd, flags, grads), m in zip(before, prefix):
        after = m.state_dict()
        assert sd.keys() == after.keys()
        assert all(torch.equal(sd[k], after[k]) for k in sd)
        assert [s.training for s in m.modules()] == flags
        assert [p.requires_grad for p in m.parameters()] == grads

    # fused: every BN folded (each one only inside its FoldedConvBn), inference form
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for p in prefix for m in p.modules())
    assert len(fused.folded) == n_bn > 0
    pairs = [m for m in fused.modules() if isinstance(m, FoldedConvBn)]
    assert len(pairs) == n_bn
    assert {id(m) for m in fused.modules() if isinstance(m, nn.BatchNorm2d)} == {
        id(p.bn) for p in pairs
    }
    assert not fused.training and not any(m.training for m in fused.modules())
    assert fused.train().training is False

    for m in prefix:
        m.eval()
    x2 = torch.randn(3, 3, 48, 48)  # another input than the example
    ref = _run(prefix, x2)
    out = fused(x2)
    assert out.is_contiguous()
    assert not out.requires_grad  # the weights do require grad: the copy runs without autograd
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)


def _storages(m: nn.Module) -> set[int]:
    """Storage addresses of every tensor a module tree holds (registered or plain attributes)."""
    out = set()
    for sub in m.modules():
        own = (*sub.parameters(recurse=False), *sub.buffers(recurse=False))
        for v in (*vars(sub).values(), *own):
            if isinstance(v, Tensor):
                out.add(v.untyped_storage().data_ptr())
    return out


@pytest.mark.parametrize("name", ["mobilenetv2_100", "efficientnet_lite0", "tv_resnet18"])
def test_copy_shares_every_weight(name: str) -> None:
    prefix = _prefix(_model(name))
    fused = inference_copy(prefix, example=X)
    assert fused is not None and fused.folded
    originals = {id(t): t for m in prefix for t in (*m.parameters(), *m.buffers())}
    copied = [*fused.parameters(), *fused.buffers()]
    assert len(copied) == len(originals)
    assert all(originals.get(id(t)) is t for t in copied)
    assert {t.data_ptr() for t in copied} == {t.data_ptr() for t in originals.values()}
    # no other tensor either: nothing folded or converted is kept
    assert _storages(fused) <= {t.untyped_storage().data_ptr() for t in originals.values()}


def _conv_bn(cin: int, cout: int) -> tuple[nn.Conv2d, nn.BatchNorm2d, Tensor, Tensor]:
    """A conv, a calibrated BN, and the BN's running mean and var."""
    g = torch.Generator().manual_seed(3)
    conv, bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout).eval()
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None
    with torch.no_grad():
        mean.copy_(torch.randn(cout, generator=g))
        var.copy_(torch.rand(cout, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(cout, generator=g))
    return conv, bn, mean, var


@pytest.mark.parametrize(
    ("cin", "cout", "size", "always"),
    [(3, 8, 16, True), (3, 8, 16, False), (64, 64, 1, False)],  # folded / folded / not worth it
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_weight_changes_reach_the_next_call(
    cin: int, cout: int, size: int, always: bool, channels_last: bool
) -> None:
    conv, bn, mean, var = _conv_bn(cin, cout)
    mods: list[nn.Module] = [conv, bn, nn.ReLU()]
    x = torch.randn(2, cin, size, size, generator=torch.Generator().manual_seed(4))
    fused = inference_copy(mods, example=x, channels_last=channels_last)
    assert fused is not None and fused.folded == [("0", "1")]
    pair = fused.body.get_submodule("0")
    assert isinstance(pair, FoldedConvBn)
    pair.always_fold = always
    first = fused(x)
    torch.testing.assert_close(first, _run(mods, x), rtol=1e-4, atol=1e-5)

    conv.weight.data.copy_(conv.weight.data * -0.5)  # no version bump through .data
    mean.data.copy_(mean.data + 1.0)
    var.data.copy_(var.data * 4.0)
    bn.bias.data.copy_(bn.bias.data - 0.3)
    second = fused(x)
    assert not torch.allclose(second, first, atol=1e-3)
    torch.testing.assert_close(second, _run(mods, x), rtol=1e-4, atol=1e-5)


def test_whole_model_and_batchnormact_keeps_activation() -> None:
    model = _model("efficientnet_lite0")
    fused = inference_copy(model, example=X)
    assert fused is not None
    body = fused.body
    # timm BatchNormAct2d(bn1) -> its activation (ReLU6) only
    assert isinstance(model.bn1, timm.layers.BatchNormAct2d)
    assert not isinstance(body.bn1, nn.BatchNorm2d)
    assert any(isinstance(m, nn.ReLU6) for m in body.bn1.modules())
    assert isinstance(body.blocks[1][0].bn3, nn.Identity)  # no act after the projection
    torch.testing.assert_close(fused(X), _run([model], X), rtol=1e-3, atol=1e-4)


def test_a_broken_fold_never_reaches_an_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold that does not reproduce conv then BN is caught the first time the pair folds
    (at the example's size or at a later, larger batch) and the pair runs unfolded."""
    prefix = _prefix(_model("mobilenetv2_100"))
    real = fuse._scale_shift

    def broken(*args: Tensor | float | None) -> tuple[Tensor, Tensor]:
        scale, shift = real(*args)  # type: ignore[arg-type]
        return scale, shift + 0.01  # e.g. a forgotten term

    def pairs(fused: InferenceCopy) -> list[FoldedConvBn]:
        return [m for m in fused.body.modules() if isinstance(m, FoldedConvBn)]

    monkeypatch.setattr(fuse, "_scale_shift", broken)
    fused = inference_copy(prefix, example=X)
    assert fused is not None
    torch.testing.assert_close(fused(X), _run(prefix, X), rtol=1e-3, atol=1e-4)
    folded_at_x = [p for p in pairs(fused) if p.fold_checked]
    assert folded_at_x and not any(p.fold_ok for p in folded_at_x)
    # a pair not folded at the example's size is checked when it first folds
    tiny = X[:, :, :8, :8]
    monkeypatch.setattr(fuse.FoldedConvBn, "_worth_folding", lambda self, x: False)
    fused = inference_copy(prefix, example=tiny)
    assert fused is not None and not any(p.fold_checked for p in pairs(fused))
    monkeypatch.setattr(fuse.FoldedConvBn, "_worth_folding", lambda self, x: True)
    torch.testing.assert_close(fused(X), _run(prefix, X), rtol=1e-3, atol=1e-4)
    assert all(p.fold_checked and not p.fold_ok for p in pairs(fused))
    # the same copies with the right fold: every pair checked folds
    monkeypatch.setattr(fuse, "_scale_shift", real)
    fused = inference_copy(prefix, example=tiny)
    assert fused is not None
    torch.testing.assert_close(fused(X), _run(prefix, X), rtol=1e-3, atol=1e-4)
    assert all(p.fold_checked and p.fold_ok for p in pairs(fused))


def test_a_pair_too_large_to_fold_makes_no_folded_weight_to_check() -> None:
    """inference_copy checks the copy as it runs: a conv whose weight outgrows its output
    at the example's size makes no folded copy of its weight (the deep convs of ResNet-18
    at 32x32: 9 MB each), before or after."""
    conv, bn, _, _ = _conv_bn(256, 256)
    x = torch.randn(4, 256, 2, 2)
    assert conv.weight.numel() > x.shape[0] * 256 * 2 * 2  # not worth folding at x
    biggest = _largest_allocation(lambda: inference_copy([conv, bn], example=x))
    assert biggest < conv.weight.nbytes // 4, (
        f"{biggest} bytes for a {conv.weight.nbytes}-byte weight"
    )


@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18", "tv_mobilenet_v2"])
def test_pairing_table_fallback_without_fx(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    prefix = _prefix(_model(name))
    with_fx = inference_copy(prefix, example=X)

    def no_fx(m: nn.Module) -> None:
        raise RuntimeError("untraceable")

    monkeypatch.setattr(fuse, "_trace", no_fx)
    without = inference_copy(prefix, example=X)
    assert with_fx is not None and without is not None
    assert sorted(without.folded) == sorted(with_fx.folded)


def test_a_graph_module_is_read_not_traced_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The frozen part of a partition is an fx graph module: its graph gives the pairs."""
    import torch.fx as fx

    prefix = nn.Sequential(*_prefix(_model("resnet18")))
    gm = fx.symbolic_trace(prefix)
    traced = inference_copy(prefix, example=X)

    def no_trace(m: nn.Module) -> None:
        raise AssertionError("traced again")

    monkeypatch.setattr(fuse, "_trace", no_trace)
    read = inference_copy(gm, example=X)
    assert traced is not None and read is not None and read.folded
    assert len(read.folded) == len(traced.folded)


def test_a_graph_module_is_copied_without_compiling_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The copy of a graph module shares its compiled code (recompiling cost a third of a
    ConvNeXt's copy) and still never reaches the original when it folds."""
    import torch.fx as fx

    gm = fx.symbolic_trace(nn.Sequential(*_prefix(_model("resnet18"))))
    convs = {n: type(m) for n, m in gm.named_modules()}

    def no_recompile(self: fx.GraphModule) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(fx.GraphModule, "recompile", no_recompile)
    fast = inference_copy(gm, example=X)
    assert fast is not None and fast.folded
    assert {n: type(m) for n, m in gm.named_modules()} == convs  # the original keeps its BNs
    with torch.no_grad():
        torch.testing.assert_close(fast(X), gm.eval()(X), rtol=1e-3, atol=1e-4)


class _Counted(nn.Module):
    """A ReLU that records its runs (in a list its shallow copies share; not fx's trace)."""

    def __init__(self, calls: list[int]) -> None:
        super().__init__()
        self.calls = calls

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor):  # not an fx proxy
            self.calls.append(1)
        return torch.relu(x)


def test_check_runs_once_and_takes_a_given_reference() -> None:
    calls: list[int] = []
    plain = [nn.Conv2d(3, 4, 3), _Counted(calls)]
    assert inference_copy(plain, example=X) is not None
    assert len(calls) == 2  # the reference and one check, as the copy will run
    with torch.no_grad():
        ref = nn.Sequential(*plain).eval()(X)
    calls.clear()
    fast = inference_copy(plain, example=X, reference=ref)
    assert fast is not None and len(calls) == 1  # the given reference is not computed again
    assert inference_copy(plain, example=X, reference=ref + 0.01) is None  # it is checked

    calls.clear()
    folding = _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _Counted(calls)))
    calls.clear()
    fast = inference_copy(folding, example=X)
    assert fast is not None and fast.folded == [("0", "1")]
    assert len(calls) == 2  # folding too: each pair's fold is checked as it first folds
    assert all(
        p.fold_checked and p.fold_ok for p in fast.body.modules() if isinstance(p, FoldedConvBn)
    )


class _Reuse(nn.Module):
    """conv output feeds BN *and* a residual: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)  # registered before the conv on purpose
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn2(self.conv2(z))


class _BnFirst(nn.Module):
    """Registration order says conv->bn, forward order is bn->conv: no pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.bn(x))


def test_only_exclusive_forward_order_pairs_are_folded() -> None:
    reuse = _calibrated(_Reuse())
    fused = inference_copy(reuse, example=X)
    assert fused is not None and fused.folded == [("conv2", "bn2")]
    assert isinstance(fused.body.bn, nn.BatchNorm2d)

    bn_first = _BnFirst()
    with torch.no_grad():
        bn_first.bn.running_mean.uniform_(-1, 1)
        bn_first.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 16, 16)
    fused2 = inference_copy([bn_first.eval(), nn.ReLU()], example=x)
    assert fused2 is not None and fused2.folded == []


def test_non_tensor_output_returns_none() -> None:
    class Named(nn.Module):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"x": x}

    assert inference_copy([nn.Conv2d(3, 3, 1), Named()], example=X) is None


def test_several_inputs_and_outputs_are_a_graph_frontier() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
            return self.bn(self.conv(x)), skip * 2

    pair = Pair().eval()
    fused = inference_copy(pair, example=(X, X))
    assert fused is not None and fused.folded == [("conv", "bn")]
    out = fused(X, X)
    with torch.no_grad():
        ref = pair(X, X)
    assert isinstance(out, tuple) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, ref))


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4]),
    bias=st.booleans(),
    affine=st.booleans(),
    stride=st.integers(1, 2),
    kernel=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_fold_single_conv_bn(
    groups: int, bias: bool, affine: bool, stride: int, kernel: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(4, 8, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(8, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(8, generator=g))
        bn.running_var.copy_(torch.rand(8, generator=g) + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(8, generator=g))
            bn.bias.copy_(torch.randn(8, generator=g))
    x = torch.randn(2, 4, 9, 9, generator=g)
    fused = inference_copy([conv, bn], example=x)
    assert fused is not None and fused.folded == [("0", "1")]
    torch.testing.assert_close(fused(x), _run([conv.eval(), bn.eval()], x), rtol=1e-4, atol=1e-5)


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made while ``fn()`` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


@pytest.mark.parametrize("weight_layout", [torch.contiguous_format, torch.channels_last])
def test_a_conv_not_worth_folding_copies_no_weight(weight_layout: torch.memory_format) -> None:
    """Deep convs of a convnet at small inputs (ResNet's layer4: 9 MB of weight for a 1x1
    output) are not folded; run on a channels_last input they must not copy their weight
    to channels_last at each call either (the hand-written loop copies no weight)."""
    conv, bn, _, _ = _conv_bn(256, 256)
    conv.weight.data = conv.weight.data.contiguous(memory_format=weight_layout)
    pair = FoldedConvBn(conv, bn, channels_last=True)
    x = torch.randn(4, 256, 2, 2).contiguous(memory_format=torch.channels_last)
    assert conv.weight.numel() > x.shape[0] * 256 * 2 * 2  # so the conv is not folded
    with torch.no_grad():
        ref = bn(conv(x))
        biggest = _largest_allocation(lambda: pair(x))
        torch.testing.assert_close(pair(x), ref, rtol=1e-4, atol=1e-5)
    assert biggest < conv.weight.nbytes // 4, (
        f"{biggest} bytes for a {conv.weight.nbytes}-byte weight"
    )
