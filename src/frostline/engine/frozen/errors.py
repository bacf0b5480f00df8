"""Why the frozen part could not be found: the errors of tracing and splitting."""

from __future__ import annotations

__all__ = ["GraphError", "RandomnessError"]


class GraphError(RuntimeError):
    """The model could not be traced or partitioned; ``str(err)`` says why."""


class RandomnessError(GraphError):
    """Randomness stops the trace or the split: the model's own forward draws random
    numbers while it is traced (the draw, or a branch on it, would be baked into the graph),
    or the split would change the order of the model's random draws."""
