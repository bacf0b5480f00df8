"""``BackupAndRestore``: Keras 3's name for fit's exact checkpoints and resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from frostline.api.callbacks.save_freq import SaveFrequency
from frostline.engine.callbacks import BackupCallback
from frostline.engine.distributed import is_main


class BackupAndRestore(BackupCallback):
    """Back the run up in ``backup_dir`` and, when ``fit`` starts and a backup is there
    (the last run was interrupted), go on from it.

    As Keras 3's: ``save_freq="epoch"`` backs up at each epoch's end, an int N after every
    N training batches (counted across epochs); ``delete_checkpoint=True`` removes
    ``backup_dir`` when training ends normally (an interrupted run keeps it);
    ``double_checkpoint=True`` keeps the previous backup too. Beyond Keras (which keeps
    the weights and the epoch number, and restarts an interrupted epoch from its first
    batch), a backup is one of ``fit(checkpoint_dir=...)``'s exact checkpoints: weights,
    trainable state, optimizer state, RNG states, every callback's state and, for a
    backup taken mid-epoch, the batch and the epoch's running loss and metrics, so the
    resumed run goes on from the next batch and ends bitwise where an uninterrupted
    one ends (on CPU, for arrays, tensors and Datasets; a DataLoader's epoch is
    re-read up to that batch). A backup is written after every callback's hook for its
    batch or epoch has run. An explicit ``fit(resume=...)`` takes precedence.

    >>> cb = BackupAndRestore("backup", save_freq=2)
    >>> [cb.save_now(b) for b in (0, 1, None)]
    [False, True, False]
    """

    writes_weights = False

    def __init__(
        self,
        backup_dir: str | os.PathLike,
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
    ) -> None:
        if not backup_dir:
            raise ValueError(f"BackupAndRestore needs a backup_dir, got {backup_dir!r}")
        for name, value in (
            ("double_checkpoint", double_checkpoint),
            ("delete_checkpoint", delete_checkpoint),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"BackupAndRestore: {name} must be a bool, got {value!r}")
        self.backup_dir = Path(backup_dir)
        self.save_freq = SaveFrequency(save_freq, "BackupAndRestore")
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.keep_checkpoints = 2 if double_checkpoint else 1

    def save_now(self, batch: int | None) -> bool:
        if batch is None:
            return self.save_freq.per_epoch
        return self.save_freq.on_batch(batch)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and is_main() and self.backup_dir.exists():
            shutil.rmtree(self.backup_dir)

    def get_state(self) -> dict:
        return {"save_freq": self.save_freq.get_state()}

    def set_state(self, state: dict) -> None:
        self.save_freq.set_state(state.get("save_freq") or {})
