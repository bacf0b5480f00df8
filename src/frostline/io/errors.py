"""The error and warning classes of the persistence layer.

Every module that reads or writes frostline files raises :class:`CheckpointError`
(or its subclass :class:`UnsafeFileError`, for a file that asks to run code) and
warns with :class:`CheckpointWarning`; callers import them from here.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointWarning", "UnsafeFileError"]


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


class UnsafeFileError(CheckpointError):
    """A model file asks to call something outside frostline's allow-list.

    The message names what the file asked for and, where trusting it is possible,
    how to trust it (``fl.load(path, trusted_modules=[...])``, ``--trust PACKAGE``).

    Example:
        >>> issubclass(UnsafeFileError, CheckpointError)
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
