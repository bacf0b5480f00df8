"""``TerminateOnNaN``, as Keras 3's."""

from __future__ import annotations

import math

from frostline.engine.callbacks import Callback
from frostline.engine.distributed import is_main


class TerminateOnNaN(Callback):
    """Stop training when a batch loss is NaN or infinite (``raise_error=True``: raise instead).

    Without it ``fit`` raises on a non-finite loss by default (``on_nan="raise"``).

    >>> TerminateOnNaN(raise_error=True).raise_error
    True
    """

    writes_weights = False

    stops_on_nan = True

    def __init__(self, raise_error: bool = False) -> None:
        self.raise_error = bool(raise_error)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return
        if self.raise_error:
            raise RuntimeError(
                f"NaN or Inf loss encountered at batch {batch}. Loss value: {loss}. "
                "Terminating training immediately."
            )
        if is_main():
            print(f"Batch {batch}: Invalid loss, terminating training")
        self.model.stop_training = True
