"""``CSVLogger``, writing the columns Keras 3's writes (atomically)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from frostline.engine.callbacks import Callback
from frostline.engine.distributed import is_main
from frostline.io.atomic import atomic_write_text


def _cell(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        return f'"[{", ".join(map(str, value))}]"'
    return value


class CSVLogger(Callback):
    """One row per epoch: ``epoch`` then the first epoch's log keys, sorted (Keras's columns).

    When the first epoch has no ``val_`` keys, ``val_<key>`` columns are added too
    (filled with ``NA``, as in Keras); a key missing in a later epoch is ``NA``.
    ``append=True`` keeps what the file held (a header only if it was empty). The
    file is rewritten atomically each epoch, so it is never half-written.

    >>> import tempfile, os; path = os.path.join(tempfile.mkdtemp(), "log.csv")
    >>> cb = CSVLogger(path); cb.on_train_begin(); cb.on_epoch_end(0, {"loss": 0.5})
    >>> open(path).read().splitlines()
    ['epoch,loss,val_loss', '0,0.5,NA']
    """

    writes_weights = False

    def __init__(
        self, filename: str | os.PathLike, separator: str = ",", append: bool = False
    ) -> None:
        self.filename = Path(filename)
        self.separator = separator
        self.append = bool(append)
        self.prefix = ""
        self.keys: list[str] | None = None
        self.rows: list[dict[str, Any]] = []
        self.header = True
        self._restored = False

    def on_train_begin(self, logs=None):
        if self._restored:
            self._restored = False
            return
        self.prefix = ""
        if self.append and self.filename.exists():
            with open(self.filename, newline="") as f:  # keep its line endings
                self.prefix = f.read()
            if self.prefix and not self.prefix.endswith("\n"):
                self.prefix += "\r\n"
        self.header = not self.prefix
        self.keys = None
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.keys is None:
            keys = sorted(logs)
            if keys and not any(k.startswith("val_") for k in keys):
                keys += [f"val_{k}" for k in keys]
            self.keys = keys
        row = {"epoch": epoch}
        row.update((k, _cell(logs.get(k, "NA"))) for k in self.keys)
        self.rows.append(row)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["epoch", *self.keys], delimiter=self.separator)
        if self.header:
            w.writeheader()
        w.writerows(self.rows)
        if is_main():
            atomic_write_text(self.filename, self.prefix + buf.getvalue())

    def get_state(self) -> dict:
        return {"prefix": self.prefix, "keys": self.keys, "rows": self.rows, "header": self.header}

    def set_state(self, state: dict) -> None:
        self.prefix = state.get("prefix", "")
        self.keys = state.get("keys")
        self.rows = [dict(r) for r in state.get("rows", [])]
        self.header = bool(state.get("header", True))
        self._restored = True
