"""``save_freq``: "epoch", or every N batches counted as Keras 3 counts them."""

from __future__ import annotations

from frostline.core.checks import require_int


class SaveFrequency:
    """Keras's ``save_freq`` of ``ModelCheckpoint`` and ``BackupAndRestore``: ``"epoch"``
    (at each epoch's end) or an int N (every N training batches, counted across epochs).

    >>> f = SaveFrequency(3, "ModelCheckpoint")
    >>> [f.on_batch(b) for b in (0, 1, 2, 3, 0, 1)]  # a new epoch restarts the batch numbers
    [False, False, True, False, False, True]
    """

    def __init__(self, save_freq: str | int, owner: str) -> None:
        if save_freq != "epoch":
            if isinstance(save_freq, str | bool):
                raise ValueError(
                    f"{owner}: save_freq must be 'epoch' or an int number of batches, "
                    f"got {save_freq!r}"
                )
            require_int(f"{owner}: save_freq", save_freq, minimum=1)
        self.value = save_freq
        self._since_last = 0
        self._last_batch: int | None = None

    @property
    def per_epoch(self) -> bool:
        return self.value == "epoch"

    def on_batch(self, batch: int) -> bool:
        """Count training batch ``batch`` (0-based in its epoch); True when it is time to save."""
        if self.value == "epoch":
            return False
        if self._last_batch is None or batch <= self._last_batch:
            self._since_last += batch + 1  # a new epoch: batches are zero-indexed
        else:
            self._since_last += batch - self._last_batch
        self._last_batch = batch
        assert isinstance(self.value, int)
        if self._since_last >= self.value:
            self._since_last = 0
            return True
        return False

    def get_state(self) -> dict:
        return {"since_last": self._since_last, "last_batch": self._last_batch}

    def set_state(self, state: dict) -> None:
        self._since_last = int(state.get("since_last", 0))
        last = state.get("last_batch")
        self._last_batch = None if last is None else int(last)
