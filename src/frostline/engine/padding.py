"""TensorFlow's 'SAME' zero padding for the folded convs, into a buffer kept between calls.

:func:`same_padding` is the padding itself (timm's ``pad_same``, Keras's
``padding="same"``); :class:`PadBuffer` is where :class:`frostline.engine.fuse.FoldedConvBn`
writes padded inputs, so that the largest tensor of a forward is not allocated (and, by
the C allocator, faulted in) afresh at every call.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["PadBuffer", "same_padding"]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' zero padding of one side of an input, as ``(before, after)``.

    The output has ``ceil(size / stride)`` positions; the extra pixel of an odd total goes
    after (timm's ``pad_same``, Keras's ``padding="same"``).

    Example:
        >>> same_padding(64, 3, 2, 1), same_padding(16, 5, 2, 1), same_padding(8, 3, 1, 2)
        ((0, 1), (1, 2), (2, 2))
    """
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class PadBuffer:
    """One buffer that zero-padded inputs are written into, reused from call to call.

    Allocating each padded input afresh is what made TF 'same' padding costly: for
    EfficientNet-Lite0 at 64 px and batch 64 it is the largest tensor of the forward
    (27 MB), which the C allocator gives back to the system when it is freed, so every
    call faulted its pages in again. Here the buffer grows to the largest padded input
    seen and stays; the folded convs of one :func:`inference_copy` share one (they run
    one at a time, and each padded input is only read by its conv before the next pad).
    The border is zeroed again whenever the shape or padding differs from the last call.
    Each thread pads into a buffer of its own (a copy run from two threads at once never
    has one overwrite the other's padded input), and a copy or a pickle of a
    ``PadBuffer`` starts empty.

    Example:
        >>> import torch
        >>> buf = PadBuffer()
        >>> y = buf.pad(torch.ones(1, 1, 2, 2), 0, 1, 0, 1)
        >>> y[0, 0].tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
        >>> buf.pad(torch.ones(1, 1, 1, 1), 1, 1, 1, 1)[0, 0].tolist()
        [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """

    def __init__(self) -> None:
        self._local = threading.local()  # .flat: the buffer; .last: whose border is zero

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (PadBuffer, ())

    @property
    def nbytes(self) -> int:
        """The bytes this thread's buffer holds (0 before its first pad or after
        :meth:`release`).

        Example:
            >>> import torch
            >>> buf = PadBuffer()
            >>> _ = buf.pad(torch.ones(2, 3, 4, 4), 1, 1, 1, 1)
            >>> buf.nbytes  # 2 * 3 * 6 * 6 float32
            864
        """
        flat: Tensor | None = getattr(self._local, "flat", None)
        return 0 if flat is None else flat.numel() * flat.element_size()

    def release(self) -> None:
        """Drop every thread's buffer (a view handed out earlier stays valid); the next
        :meth:`pad` allocates again. For when the copy will not run for a while (its
        outputs are cached): the buffer is the largest padded input it has seen.

        Example:
            >>> import torch
            >>> buf = PadBuffer()
            >>> _ = buf.pad(torch.ones(1, 1, 2, 2), 1, 1, 1, 1)
            >>> buf.release()
            >>> buf.nbytes
            0
        """
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> PadBuffer:
        return PadBuffer()

    def pad(self, x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
        """``F.pad(x, (left, right, top, bottom))`` of a 4-d ``x``, in ``x``'s memory
        layout, as a view of this thread's buffer (valid until its next call)."""
        n, ch, h, w = x.shape
        hp, wp = h + top + bottom, w + left + right
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        numel = n * ch * hp * wp
        mine = self._local
        flat: Tensor | None = getattr(mine, "flat", None)
        if flat is None or flat.numel() < numel or (flat.dtype, flat.device) != (x.dtype, x.device):
            mine.flat = mine.last = None  # the old buffer goes before the new one is made
            flat = mine.flat = torch.empty(numel, dtype=x.dtype, device=x.device)
        if nhwc:
            buf = flat[:numel].view(n, hp, wp, ch).permute(0, 3, 1, 2)
        else:
            buf = flat[:numel].view(n, ch, hp, wp)
        key = (n, ch, hp, wp, nhwc, top, left)
        if mine.last != key:
            mine.last = None
            buf[:, :, :top].zero_()
            buf[:, :, top + h :].zero_()
            buf[:, :, top : top + h, :left].zero_()
            buf[:, :, top : top + h, left + w :].zero_()
            mine.last = key
        buf[:, :, top : top + h, left : left + w].copy_(x)
        return buf
