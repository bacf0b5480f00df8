"""What ``fit`` was asked for: one frozen :class:`FitOptions`, carried unchanged from
``Model.fit`` to the trainer (:mod:`frostline.engine.trainer`), its cache options one
:class:`~frostline.engine.runner.CacheOptions` carried on unchanged to the runner."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from frostline.core.checks import require_int
from frostline.engine import data as data_mod
from frostline.engine.runner import CacheOptions

__all__ = ["FitOptions"]


@dataclass(frozen=True)
class FitOptions:
    """What ``fit`` was asked for, carried unchanged from ``Model.fit`` to the trainer;
    ``cache_options`` (one :class:`CacheOptions`) goes on unchanged to the runner.

    >>> FitOptions(epochs=3).epochs
    3
    >>> FitOptions(cache_options=CacheOptions(cache=False)).cache_options.cache
    False
    """

    batch_size: int | None = None
    epochs: int = 1
    verbose: int | str = "auto"
    callbacks: Iterable | None = None
    validation_split: float = 0.0
    validation_data: Any = None
    shuffle: bool = True
    class_weight: Mapping | None = None
    sample_weight: Any = None
    initial_epoch: int = 0
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    validation_batch_size: int | None = None
    validation_freq: int | Sequence[int] = 1
    seed: int | None = None
    cache_options: CacheOptions = CacheOptions()
    checkpoint_dir: Any = None
    keep_checkpoints: int = 3
    resume: Any = None
    verify_frozen: bool = True
    on_nan: str = "raise"
    unfreeze_next: Iterable[Tensor] = ()
    workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.cache_options, CacheOptions):
            raise TypeError(
                f"cache_options must be a CacheOptions, got {type(self.cache_options).__name__}"
            )
        require_int("epochs", self.epochs)
        require_int("workers (worker processes reading a Dataset)", self.workers, minimum=0)
        require_int("initial_epoch", self.initial_epoch)
        if self.on_nan not in ("raise", "stop"):
            raise ValueError(f"on_nan must be 'raise' or 'stop', got {self.on_nan!r}")
        data_mod.check_batch_size(self.batch_size)
        data_mod.check_batch_size(self.validation_batch_size)
        for name in ("steps_per_epoch", "validation_steps"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), minimum=1)
        data_mod.check_class_weight(self.class_weight)
        if self.class_weight is not None and self.sample_weight is not None:
            raise ValueError(
                "class_weight and sample_weight cannot both be given (as in Keras): multiply "
                "the class weights into the sample weights instead"
            )
        freq = self.validation_freq
        if isinstance(freq, list | tuple | set | range):
            for e in freq:
                require_int("each epoch in validation_freq", e, minimum=1)
        else:
            require_int("validation_freq (an int, or a list of 1-based epochs)", freq, minimum=1)
