"""The one error and warning class of the persistence layer.

Every module that reads or writes frostline files raises :class:`CheckpointError`
and warns with :class:`CheckpointWarning`; callers import both from here.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointWarning"]


class CheckpointError(ValueError):
    """A checkpoint or tensor file is missing, incomplete, corrupted or incompatible.

    The message always names the offending path and what is wrong with it.

    Example:
        >>> from frostline.io.safetensors_io import load_safetensors
        >>> try:
        ...     load_safetensors("/nonexistent/model.safetensors")
        ... except CheckpointError as e:
        ...     print("missing" in str(e))
        True
    """


class CheckpointWarning(UserWarning):
    """Emitted when an incomplete or corrupted checkpoint is skipped or removed.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("skipping epoch-00003", CheckpointWarning)
        >>> caught[0].category is CheckpointWarning
        True
    """
