"""TF 'same' padding in folded convs (timm's Conv2dSame): equal to timm's, and cheap."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from timm.layers import Conv2dSame
from timm.layers.padding import get_same_padding
from torch import Tensor, nn

import frostline.engine.fuse as fuse
from frostline.engine.fuse import FoldedConvBn, inference_copy, same_padding


def test_same_padding_is_timms() -> None:
    for size, kernel, stride, dilation in itertools.product(
        range(1, 21), (1, 2, 3, 5, 7), (1, 2, 3), (1, 2, 3)
    ):
        total = get_same_padding(size, kernel, stride, dilation)
        assert same_padding(size, kernel, stride, dilation) == (total // 2, total - total // 2)


def _pair(cin: int, kernel: int, stride: int, dilation: int, groups: int) -> FoldedConvBn:
    g = torch.Generator().manual_seed(kernel * 100 + stride * 10 + dilation)
    conv = Conv2dSame(cin, cin, kernel, stride=stride, dilation=dilation, groups=groups)
    bn = nn.BatchNorm2d(cin).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        bn.running_mean.copy_(torch.randn(cin, generator=g))
        bn.running_var.copy_(torch.rand(cin, generator=g) + 0.5)
    return FoldedConvBn(conv, bn, channels_last=True)


def _reference(pair: FoldedConvBn, x: Tensor) -> Tensor:
    return pair.bn(pair.conv(x))  # timm's Conv2dSame.forward: pad_same, then the conv


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation"), [(3, 2, 1), (5, 2, 1), (3, 1, 2), (2, 1, 1)]
)
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("channels_last", [True, False])
def test_padded_conv_equals_timms_on_odd_and_even_sizes(
    kernel: int, stride: int, dilation: int, groups: int, channels_last: bool
) -> None:
    """Sizes, batches and layouts change between calls: the kept buffer never leaks a
    previous input into the border or the inside (batch 6, then 3, then 6 again, at
    even and odd sides)."""
    pair = _pair(8, kernel, stride, dilation, groups)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, h, w in [(6, 16, 16), (3, 16, 16), (6, 16, 16), (6, 15, 17), (2, 9, 8)]:
            x = (torch.randn(n, 8, h, w, generator=g) + 3.0).contiguous(memory_format=layout)
            torch.testing.assert_close(pair(x), _reference(pair, x), rtol=1e-4, atol=1e-4)


def _largest_allocation(fn) -> int:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


def test_padding_allocates_no_padded_input_after_the_first_call() -> None:
    """A padded input allocated afresh at each call was the costliest op of
    EfficientNet-Lite0's folded forward (64 px, batch 64: 27 MB, its pages faulted in
    again at every call); it is made once and only its inside is written again."""
    pair = _pair(32, 3, 2, 1, 32)  # a depthwise stride-2 conv, as in EfficientNet
    x = torch.randn(8, 32, 32, 32).contiguous(memory_format=torch.channels_last)
    padded = 8 * 32 * 33 * 33 * 4
    with torch.no_grad():
        first = _largest_allocation(lambda: pair(x))
        again = _largest_allocation(lambda: pair(x))
        smaller = _largest_allocation(lambda: pair(x[:4]))
        torch.testing.assert_close(pair(x[:4]), _reference(pair, x[:4]), rtol=1e-4, atol=1e-4)
    assert first >= padded
    assert again < padded // 2 and smaller < padded // 2, (again, smaller, padded)


def test_with_autograd_the_padded_input_is_never_reused() -> None:
    """Autograd may keep the conv's input for the backward pass: with grad enabled each
    call pads into a new tensor, and gradients equal timm's."""
    pair = _pair(4, 3, 2, 1, 1)
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    y = pair(x)
    pair(torch.zeros(2, 4, 10, 10))  # a later call must not change what y's graph holds
    w = pair.conv.weight  # its gradient reads the padded input the conv kept
    grads = torch.autograd.grad(y.square().sum(), (x, w))
    ref_x = x.detach().clone().requires_grad_(True)
    refs = torch.autograd.grad(_reference(pair, ref_x).square().sum(), (ref_x, w))
    for grad, ref in zip(grads, refs):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-4)


def test_the_convs_of_one_copy_share_one_buffer_and_each_sees_its_own_zero_border() -> None:
    """Two 'same' convs of different kernels and sizes pad into one buffer, one after the
    other: each must see a zero border, not the values the other wrote there."""
    a, b = _pair(8, 3, 2, 1, 8), _pair(8, 5, 2, 1, 1)
    net = nn.Sequential(a.conv, a.bn, nn.ReLU(), b.conv, b.bn)
    fast = inference_copy(net, example=torch.randn(2, 8, 16, 16))
    assert fast is not None and fast.folded == [("0", "1"), ("3", "4")]
    pairs = [m for m in fast.body.modules() if isinstance(m, FoldedConvBn)]
    assert len(pairs) == 2 and pairs[0].pad_buffer is pairs[1].pad_buffer
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, side in [(4, 16), (4, 16), (2, 16), (4, 15), (4, 16)]:
            x = torch.randn(n, 8, side, side, generator=g) + 3.0
            torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-4)


def test_two_threads_running_one_copy_never_share_a_padded_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both threads pad, then both convolve (a barrier between the two steps): with one
    buffer for both, the first thread's conv would read the second thread's input."""
    pair = _pair(4, 3, 2, 1, 1)
    xs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    with torch.no_grad():
        refs = [_reference(pair, x) for x in xs]
        pair(xs[0])  # the fold is checked once, before the threads start
    barrier = threading.Barrier(2, timeout=20)
    real = fuse.F.conv2d

    def conv_after_both_padded(*args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread():
            barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(fuse.F, "conv2d", conv_after_both_padded)
    out: dict[int, Tensor] = {}

    def run(i: int) -> None:
        with torch.no_grad():
            out[i] = pair(xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        torch.testing.assert_close(out[i], refs[i], rtol=1e-4, atol=1e-4)


def test_a_copied_or_pickled_pad_buffer_starts_empty() -> None:
    import copy
    import pickle

    buf = fuse.PadBuffer()
    mine = buf.pad(torch.ones(1, 1, 2, 2), 0, 1, 0, 1)
    for other in (copy.deepcopy(buf), pickle.loads(pickle.dumps(buf)), copy.copy(buf)):
        theirs = other.pad(torch.full((1, 1, 2, 2), 2.0), 0, 1, 0, 1)
        assert theirs.sum().item() == 8.0
        assert mine.sum().item() == 4.0  # not written through the copy


def test_a_cached_fit_releases_the_copys_pad_buffer_once_the_cache_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The padding buffer is the largest padded input the folded copy saw (29 MB for
    EfficientNet-Lite0 at 96 px, batch 32): once the cache is built the epochs read the
    cache, so the buffer is freed; the fit's weights equal an uncached fit's."""
    import frostline as fl
    import frostline.engine.runner.executor as executor

    copies: list[fuse.InferenceCopy] = []

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = fuse.inference_copy(*args, **kwargs)
        if out is not None:
            copies.append(out)
        return out

    monkeypatch.setattr(executor, "inference_copy", recording)
    x = torch.randn(40, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 3

    def fitted(cache: bool) -> dict[str, Tensor]:
        torch.manual_seed(0)
        pair = _pair(4, 3, 2, 1, 1)
        body = nn.Sequential(pair.conv, pair.bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        base = fl.wrap(body, name="base")
        model = fl.Sequential([base, nn.Linear(4, 3)])
        base.trainable = False
        model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=2, batch_size=16, seed=0, verbose=0, cache=cache)
        return {k: v.detach().clone() for k, v in model.module.state_dict().items()}

    cached = fitted(True)
    assert copies and all(c.pad_buffers() for c in copies)  # the copy built the cache
    assert [b.nbytes for c in copies for b in c.pad_buffers()] == [0] * len(copies)
    plain = fitted(False)
    assert cached.keys() == plain.keys()
    for k in cached:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-5, atol=1e-6)
