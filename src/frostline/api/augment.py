"""Random augmentation layers with Keras 3's semantics: ``RandomFlip``, ``RandomRotation``.

Put them in front of a frozen base, as the Keras transfer-learning guide does. They are
active in training mode only (``model.train()``, as ``fit`` sets it) and the identity in
eval mode; each sample of a batch gets its own draw, from torch's default generator or
the ``generator`` given. frostline sees them draw random numbers, so their outputs are
never cached (unless ``fit(augment_views=K)`` asks for K cached views).

>>> import torch
>>> from frostline.api.augment import RandomFlip, RandomRotation
>>> aug = torch.nn.Sequential(RandomFlip("horizontal"), RandomRotation(0.1))
>>> aug(torch.zeros(2, 3, 8, 8)).shape
torch.Size([2, 3, 8, 8])
>>> x = torch.arange(4.0).reshape(1, 1, 1, 4)
>>> torch.equal(aug.eval()(x), x)
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["RandomFlip", "RandomRotation"]

_FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")
_FILL_MODES = {"reflect": "reflection", "nearest": "border", "constant": "zeros"}


def _check_images(x: Tensor, layer: str) -> None:
    """A clear error for a tensor that is no float image batch (a tracer's proxy passes)."""
    if isinstance(x, Tensor) and (x.dim() != 4 or not x.is_floating_point()):
        raise ValueError(
            f"{layer} expects a float batch of images (batch, channels, height, width), "
            f"got shape {tuple(x.shape)} {x.dtype}"
        )


class RandomFlip(nn.Module):
    """Flip each image at random (probability 1/2 per axis), as ``keras.layers.RandomFlip``.

    ``mode``: ``"horizontal"`` (left-right), ``"vertical"`` (up-down) or
    ``"horizontal_and_vertical"`` (each axis drawn on its own; Keras's default).

    >>> import torch
    >>> flip = RandomFlip("horizontal")
    >>> x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(64, 1, 1, 4)
    >>> y = flip(x)
    >>> sorted({tuple(r.flatten().tolist()) for r in y})
    [(0.0, 1.0, 2.0, 3.0), (3.0, 2.0, 1.0, 0.0)]
    """

    def __init__(
        self, mode: str = "horizontal_and_vertical", *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if mode not in _FLIP_MODES:
            raise ValueError(f"RandomFlip mode must be one of {_FLIP_MODES}, got {mode!r}")
        self.mode = mode
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        _check_images(x, "RandomFlip")
        n = x.shape[0]
        dims = {"horizontal": (-1,), "vertical": (-2,)}.get(self.mode, (-1, -2))
        for d in dims:
            draw = torch.rand(n, device=x.device, generator=self.generator) < 0.5
            x = torch.where(draw[:, None, None, None], x.flip(d), x)
        return x

    def extra_repr(self) -> str:
        return repr(self.mode)


class RandomRotation(nn.Module):
    """Rotate each image by a random angle, as ``keras.layers.RandomRotation``.

    ``factor``: a fraction of a full turn; a float ``f`` draws from ``[-f, f]``, a pair
    ``(lo, hi)`` from ``[lo, hi]`` (positive: counter-clockwise). ``fill_mode``:
    ``"reflect"`` (Keras's default), ``"nearest"`` or ``"constant"`` (zeros); bilinear
    interpolation about the image centre.

    >>> import torch
    >>> rot = RandomRotation((0.25, 0.25))  # always a quarter turn
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    >>> rot(x).round().flatten().tolist()
    [2.0, 4.0, 1.0, 3.0]
    """

    def __init__(
        self,
        factor: float | tuple[float, float],
        fill_mode: str = "reflect",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        lo, hi = (-float(factor), float(factor)) if isinstance(factor, int | float) else factor
        if not (isinstance(lo, int | float) and isinstance(hi, int | float)) or lo > hi:
            raise ValueError(f"RandomRotation factor must be f >= 0 or (lo, hi), got {factor!r}")
        if fill_mode not in _FILL_MODES:
            raise ValueError(
                f"RandomRotation fill_mode must be one of {sorted(_FILL_MODES)}, got {fill_mode!r}"
            )
        self.lower, self.upper = float(lo), float(hi)
        self.factor = (self.lower, self.upper)  # what a saved model file records
        self.fill_mode = fill_mode
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        _check_images(x, "RandomRotation")
        n, _, h, w = x.shape
        u = torch.rand(n, device=x.device, generator=self.generator)
        angle = (self.lower + (self.upper - self.lower) * u) * (2 * math.pi)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output pixel -> where it samples in the input, in normalised coordinates
        # (aspect-corrected so the rotation is rigid on non-square images)
        zero = torch.zeros_like(cos)
        row0 = torch.stack([cos, -sin * (h / w), zero], 1)
        row1 = torch.stack([sin * (w / h), cos, zero], 1)
        theta = torch.stack([row0, row1], 1).to(x.dtype)
        grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
        return F.grid_sample(
            x, grid, mode="bilinear", padding_mode=_FILL_MODES[self.fill_mode], align_corners=False
        )

    def extra_repr(self) -> str:
        return f"factor=({self.lower}, {self.upper}), fill_mode={self.fill_mode!r}"
