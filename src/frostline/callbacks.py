"""``fl.callbacks``: Keras callbacks with Keras 3's decisions.

>>> import frostline as fl
>>> fl.callbacks.EarlyStopping(monitor="val_loss", patience=2).patience
2
"""

from frostline.api.callbacks import (
    BackupAndRestore,
    Callback,
    CallbackList,
    CSVLogger,
    EarlyStopping,
    History,
    LearningRateScheduler,
    ModelCheckpoint,
    MonitorCallback,
    ReduceLROnPlateau,
    TerminateOnNaN,
)

__all__ = [
    "BackupAndRestore",
    "Callback",
    "CallbackList",
    "CSVLogger",
    "EarlyStopping",
    "History",
    "LearningRateScheduler",
    "ModelCheckpoint",
    "MonitorCallback",
    "ReduceLROnPlateau",
    "TerminateOnNaN",
]
