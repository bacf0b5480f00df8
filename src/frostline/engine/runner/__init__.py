"""How a training step runs the model: the frozen part, then the trainable rest.

The model is traced (:mod:`frostline.engine.frozen`) and split at the frontier of its
frozen part: every value that depends only on the inputs and frozen weights. The frozen
part runs under ``torch.no_grad`` (where that works, as a verified channels_last copy of
its structure that shares its weights and folds BatchNorm into the convs at each call,
:mod:`frostline.engine.fuse`), and when the data is deterministic and the frozen part draws no
random numbers, its frontier tensors are cached across epochs and fits
(:mod:`frostline.engine.activations`). The cache key holds the frontier, a fingerprint
of the data, a content digest of the frozen weights and the frozen part's modes, so the
cache is rebuilt, never silently stale, when any of them changes.

Where the model cannot be traced, the trace does not reproduce the model, or nothing is
frozen, the runner runs the whole model as a plain loop would; :attr:`Runner.status`
says why, as a :class:`CacheStatus` per data role.

One module per concept (after Lightning's loop objects): :mod:`.status` (fit's
:class:`CacheOptions` and the typed :class:`CacheStatus`), :mod:`.weights` (keys of the
frozen weights), :mod:`.splits` (which split holds for the trainable set and modes),
:mod:`.executor` (running the frozen part, folded where that is exact), :mod:`.reading`
(reading data for the cache with every generator watched), :mod:`.cache` (the
activation cache per data role), :mod:`.facade` (:class:`Runner`, which puts them
together).
"""

from frostline.engine.runner.executor import WholeModel
from frostline.engine.runner.facade import Runner
from frostline.engine.runner.reading import fingerprint_of
from frostline.engine.runner.status import CacheOptions, CacheState, CacheStatus, OffReason

__all__ = [
    "CacheOptions",
    "CacheState",
    "CacheStatus",
    "OffReason",
    "Runner",
    "WholeModel",
    "fingerprint_of",
]
