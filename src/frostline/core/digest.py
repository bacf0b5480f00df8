"""Digests of tensors and of plain values: one place for the hashing frostline does.

Tensor digests are exact (they read every byte), so they see writes that bypass
torch's version counter (``p.data.copy_``). They use SHA-256, which CPUs with SHA
extensions hash about twice as fast as BLAKE2b (~2 GB/s against ~1 GB/s on one core).

>>> import torch
>>> tensor_digest(torch.ones(2)) == tensor_digest(torch.ones(2)), len(text_digest(["a", 1]))
(True, 32)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["content_digest", "tensor_digest", "text_digest"]


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of one tensor's shape, dtype and bytes (any device, bfloat16 included).

    >>> import torch
    >>> a = torch.zeros(3); d = tensor_digest(a); a[0] = 1.0; tensor_digest(a) == d
    False
    """
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    _update(h, t)
    return h.hexdigest()


def _update(h: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s bytes to ``h``: a view of a contiguous CPU tensor, else one copy of it."""
    d = t.detach()
    if d.numel():
        h.update(d.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().data)


def text_digest(items: Iterable[object]) -> str:
    """BLAKE2b-128 of the ``str`` of each item, one per line (for structure descriptions).

    >>> text_digest(["layer.0", (3, 4)]) == text_digest(["layer.0", (3, 4)])
    True
    """
    return hashlib.blake2b("\n".join(map(str, items)).encode(), digest_size=16).hexdigest()


def content_digest(tensors: Iterable[torch.Tensor]) -> str:
    """One SHA-256 digest over the bytes of all ``tensors`` (in order): exact, one pass.

    Sees every write, including those hidden from ``_version`` (``p.data.copy_``). Reads
    each tensor in place (a CPU tensor is not copied), so the peak memory stays flat.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> before = content_digest([p])
        >>> p.data[0] = 2.0
        >>> content_digest([p]) == before
        False
    """
    h = hashlib.sha256()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"content_digest takes tensors, got {type(t).__name__}")
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        _update(h, t)  # tensor by tensor: no copy of all the weights at once
    return h.hexdigest()
