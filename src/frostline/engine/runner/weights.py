"""Keys of the frozen weights: a cheap per-step version and a content digest.

:class:`WeightKeys` says whether the frozen weights changed: :meth:`WeightKeys.version`
(version counters, storage, optimizer steps; read every batch) and
:meth:`WeightKeys.content_key` (a digest of the values, which also catches writes hidden
from the version counters such as ``p.data.copy_``; read once per check and memoised
until :meth:`WeightKeys.forget`). The functions below read a split's frozen part.
"""

from __future__ import annotations

from torch import Tensor

from frostline.core import batchnorm
from frostline.core.digest import tensor_digest, text_digest
from frostline.engine.fingerprints import StepCounter, weights_version
from frostline.engine.frozen import Partition

__all__ = ["WeightKeys", "frozen_tensors", "mode_string", "running_statistics"]


class WeightKeys:
    """Version and content keys of weight tensors, memoised per tensor.

    Example:
        >>> import torch
        >>> keys = WeightKeys()
        >>> w = torch.ones(3)
        >>> keys.weight_digest(w) == tensor_digest(w)
        True
        >>> keys.version([w]) == keys.version([w])
        True
    """

    def __init__(self) -> None:
        self.steps = StepCounter()
        self._digests: dict[tuple, str] = {}
        self._tensor_digests: dict[tuple, str] = {}  # (id, storage, version) -> tensor_digest

    def forget(self) -> None:
        """Forget memoised digests: the next content key reads the weights again."""
        self._digests.clear()
        self._tensor_digests.clear()

    def version(self, ts: list[Tensor]) -> tuple:
        """Per-step key of ``ts``: version counters, storage, optimizer steps."""
        try:
            return (
                tuple([t._version for t in ts]),
                tuple([t.data_ptr() for t in ts]),
                tuple([self.steps[t] for t in ts]),
            )
        except RuntimeError:  # inference tensors have no version counter
            return weights_version(ts, steps=self.steps)

    def content_key(self, tensors: list[Tensor]) -> tuple:
        """Weights key with a content digest (catches ``p.data.copy_``), read once per check."""
        plain = weights_version(tensors)
        digest = self._digests.get(plain)
        if digest is None:
            digest = self._digests[plain] = text_digest(self.weight_digest(t) for t in tensors)
        return (*plain, digest)

    def weight_digest(self, t: Tensor) -> str:
        """``tensor_digest(t)``, each tensor read once until :meth:`forget`.

        Memoised by the tensor, its storage and its version: ``fit`` hands it to the
        fingerprint that verifies the frozen weights, so the cache key reads none of them
        a second time.

        Example:
            >>> import torch
            >>> w = torch.ones(3)
            >>> WeightKeys().weight_digest(w) == tensor_digest(w)
            True
        """
        try:
            key = (id(t), t.data_ptr(), t._version)
        except RuntimeError:  # an inference tensor has no version counter: read it
            return tensor_digest(t)
        digest = self._tensor_digests.get(key)
        if digest is None:
            digest = self._tensor_digests[key] = tensor_digest(t)
        return digest


def frozen_tensors(part: Partition) -> list[Tensor]:
    """The frozen part's weights: its parameters, then its buffers (the user's tensors)."""
    assert part.frozen is not None
    return [*part.frozen.parameters(), *part.frozen.buffers()]


def running_statistics(part: Partition) -> str:
    """Which BatchNorms of the frozen part normalise with running statistics (a policy
    named differently that computes the same, ``"auto"`` on a frozen layer and
    ``"inference"``, gives the same string)."""
    assert part.frozen is not None
    return "".join(
        "1" if not m.training or batchnorm.runs_inference(m) else "0"
        for m in part.frozen.modules()
        if batchnorm.is_batchnorm(m)
    )


def mode_string(part: Partition) -> str:
    """The frozen part's BatchNorm modes and policies, and the modes its trace baked in."""
    assert part.frozen is not None
    return (
        ",".join(
            f"{m.training}:{batchnorm.mode_of(m)}"
            for m in part.frozen.modules()
            if batchnorm.is_batchnorm(m)
        )
        + f"|{hash(part.traced.modes)}"
    )
