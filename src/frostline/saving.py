"""``fl.saving``: model files (safetensors weights + JSON metadata, never pickle) and
the import-path builder ``fl.load`` can rebuild from. ``fl.load`` and ``Model.save`` are
the everyday names; these are the pieces under them.

>>> import frostline as fl
>>> fl.saving.build("torch.nn:Linear", 4, 2).count_params()
10
"""

from frostline.api.loading import (
    CheckpointError,
    ImportPathError,
    UnsafeFileError,
    build,
    import_path,
    load_model,
)
from frostline.api.saving import (
    apply_trainable_state,
    architecture_of,
    load_weights,
    read,
    save_model,
    trainable_state,
)

__all__ = [
    "apply_trainable_state",
    "architecture_of",
    "build",
    "CheckpointError",
    "import_path",
    "ImportPathError",
    "load_model",
    "load_weights",
    "read",
    "save_model",
    "trainable_state",
    "UnsafeFileError",
]
