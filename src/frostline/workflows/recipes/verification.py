"""Frozen weights checked bitwise around any code, or at every epoch of a fit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from frostline.api.callbacks import Callback
from frostline.api.layer import Layer
from frostline.engine.verify import Fingerprint, FrozenWeightsChanged, Report, fingerprint

__all__ = ["FrozenCheck", "VerifyFrozen", "verify_frozen"]


@dataclass
class FrozenCheck:
    """What :func:`verify_frozen` yields: the fingerprint, and the report once the block ends."""

    fingerprint: Fingerprint
    report: Report | None = None


@contextlib.contextmanager
def verify_frozen(model: Layer | nn.Module, *, raise_error: bool = True) -> Iterator[FrozenCheck]:
    """Check that the weights frozen on entry are bitwise unchanged on exit (any training code).

    Weights trainable on exit are exempt (they may have been unfrozen on purpose).
    Raises :class:`~frostline.engine.verify.FrozenWeightsChanged` naming each weight that moved.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> _ = net[0].requires_grad_(False)
    >>> with verify_frozen(net) as check:
    ...     with torch.no_grad():
    ...         _ = net[1].weight.add_(1.0)  # trainable: fine
    >>> check.report.ok
    True
    >>> with verify_frozen(net):
    ...     with torch.no_grad():
    ...         _ = net[0].weight.add_(1.0)
    Traceback (most recent call last):
    ...
    frostline.engine.verify.FrozenWeightsChanged: 1 frozen weight(s) changed: 0.weight
    """
    check = FrozenCheck(fingerprint(model))
    yield check
    module = model.module if isinstance(model, Layer) else model
    exempt = {id(p) for p in module.parameters() if p.requires_grad}
    check.report = check.fingerprint.check(module, exempt=exempt)
    if raise_error and not check.report.ok:
        raise FrozenWeightsChanged(str(check.report))


class VerifyFrozen(Callback):
    """Check frozen weights bitwise after every epoch (or batch) of a fit, not only at its end.

    Names the weights that moved and when; weights unfrozen meanwhile are exempt, weights
    frozen meanwhile are covered from then on. ``raise_error=False`` only records
    ``self.reports`` (one per check).

    >>> import numpy as np, torch, frostline as fl
    >>> from torch import nn
    >>> model = fl.wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    >>> model.layers[0].trainable = False
    >>> class Tamper(fl.Callback):
    ...     def on_epoch_end(self, epoch, logs=None):
    ...         if epoch == 1:
    ...             with torch.no_grad():
    ...                 self.model.module[0].bias.add_(1.0)
    >>> model.compile("adam", loss="sparse_categorical_crossentropy")
    >>> model.fit(np.random.rand(8, 4).astype("float32"), np.random.randint(0, 2, 8), epochs=3, verbose=0,
    ...           callbacks=[Tamper(), VerifyFrozen()])
    Traceback (most recent call last):
    ...
    frostline.engine.verify.FrozenWeightsChanged: 1 frozen weight(s) changed: 0.bias (found after epoch 2)
    """

    writes_weights = False

    def __init__(self, every: str = "epoch", raise_error: bool = True) -> None:
        if every not in ("epoch", "batch"):
            raise ValueError(f"every must be 'epoch' or 'batch', got {every!r}")
        self.every = every
        self.raise_error = raise_error
        self.reports: list[dict[str, Any]] = []
        self._fp: Fingerprint | None = None
        self._seen: set[int] = set()
        self._epoch = 0

    def _trainable_ids(self) -> set[int]:
        return {id(p) for p in self.model.module.parameters() if p.requires_grad}

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._fp = fingerprint(self.model)
        self._seen = self._trainable_ids()
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._seen |= self._trainable_ids()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.every == "batch":
            self._seen |= self._trainable_ids()

    def _check(self, where: str) -> None:
        if self._fp is None:
            return
        report = self._fp.check(self.model, exempt=self._seen | self._trainable_ids())
        self.reports.append(
            {
                "where": where,
                "ok": report.ok,
                "checked": report.checked,
                "moved": list(report.moved),
            }
        )
        self._fp = fingerprint(self.model)  # weights frozen meanwhile are covered from now on
        self._seen = self._trainable_ids()
        if self.raise_error and not report.ok:
            raise FrozenWeightsChanged(f"{report} (found after {where})")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.every == "batch":
            self._check(f"batch {batch + 1} of epoch {self._epoch + 1}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.every == "epoch":
            self._check(f"epoch {epoch + 1}")

    def get_state(self) -> dict:
        return {"reports": [dict(r) for r in self.reports]}

    def set_state(self, state: dict) -> None:
        self.reports = [dict(r) for r in state.get("reports", [])]
