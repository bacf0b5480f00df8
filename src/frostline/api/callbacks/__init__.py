"""Keras-style callbacks, one a module. ``self.model`` is the Model being trained.

Built-ins decide as Keras 3's do: :class:`EarlyStopping`, :class:`ReduceLROnPlateau`,
:class:`ModelCheckpoint` (on the shared :class:`MonitorCallback`),
:class:`LearningRateScheduler`, :class:`CSVLogger`, :class:`TerminateOnNaN`,
:class:`BackupAndRestore` (on fit's exact checkpoints). A
callback that keeps state across epochs implements ``get_state``/``set_state``
(JSON-able) and, for tensors, ``get_tensors``/``set_tensors`` (safetensors), so an
exact resume restores it.
"""

from frostline.api.callbacks.backup_and_restore import BackupAndRestore
from frostline.api.callbacks.csv_logger import CSVLogger
from frostline.api.callbacks.early_stopping import EarlyStopping
from frostline.api.callbacks.learning_rate_scheduler import LearningRateScheduler
from frostline.api.callbacks.model_checkpoint import ModelCheckpoint
from frostline.api.callbacks.monitor import MonitorCallback
from frostline.api.callbacks.reduce_lr_on_plateau import ReduceLROnPlateau
from frostline.api.callbacks.terminate_on_nan import TerminateOnNaN
from frostline.engine.callbacks import Callback, CallbackList, History

__all__ = [
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "History",
    "LearningRateScheduler",
    "ModelCheckpoint",
    "MonitorCallback",
    "ReduceLROnPlateau",
    "TerminateOnNaN",
]
