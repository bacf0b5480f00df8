"""The frozen part of any model, found from its dataflow graph.

One module per concept (after timm's small tracing modules): :mod:`.calling` (how a
model takes a batch, probes that change nothing), :mod:`.tracers` (the fx tracers),
:mod:`.traced` (one checked trace), :mod:`.effects` (random draws, batch statistics,
writes), :mod:`.split` (the frozen part and the trainable rest), :mod:`.errors`.

:func:`trace` records a model's forward as a ``torch.fx`` graph: first with
module-level symbolic tracing (``torch.nn`` layers and timm's no-trace modules stay
``call_module`` nodes, so BatchNorm policy hooks and Conv+BN folding keep working; a
submodule that cannot be traced becomes a leaf of its own), and where that fails with
``torch.export`` (ATen-level; how Hugging Face models trace). Python bools such as
``self.training`` are baked into a trace, so a trace belongs to one set of module modes.

:func:`partition` marks every value that depends only on the inputs, frozen parameters
and buffers, and takes the *frontier*: the frozen, per-sample tensors that trainable
computation (or the output) consumes, one tensor or several (skips, attention masks).
It returns a frozen ``GraphModule`` (inputs -> tuple of frontier tensors) and a
trainable module (frontier tensors -> the model's output) that hold the user's own
submodules and ``nn.Parameter`` objects by reference, so the optimizer, saving and the
user's module see one set of weights. Frozen values that are not per-sample tensors
(shapes, constants computed from frozen weights, non-batch-first tensors) are recomputed
on the trainable side instead of being cached.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         h = torch.relu(self.a(x))
    ...         return self.head(h) + self.b(h)
    >>> net = Net()
    >>> net.a.requires_grad_(False); net.b.requires_grad_(False)  # doctest: +ELLIPSIS
    Linear(...)
    Linear(...)
    >>> x = torch.randn(3, 4)
    >>> part = partition(trace(net, x))
    >>> part.boundary
    ('relu', 'b')
    >>> torch.allclose(part.trainable(*part.frozen(x)), net(x))
    True
    >>> any(p is net.head.weight for p in part.trainable.parameters())  # the user's own
    True
"""

from __future__ import annotations

from frostline.engine.frozen.calling import (
    batch_size_of,
    call_model,
    fetch,
    inputs_of,
    mode_key,
    module_at,
    probe_rows,
    restored_state,
    same_outputs,
    strip_root,
    take_rows,
)
from frostline.engine.frozen.effects import (
    FrozenEffect,
    FrozenWatch,
    batch_statistics,
    batch_statistics_op,
    draw_reason,
    frozen_calls,
    stochastic_frozen,
    watch_frozen,
    writes_in_place,
)
from frostline.engine.frozen.errors import GraphError, RandomnessError
from frostline.engine.frozen.split import (
    Partition,
    bridge,
    describe_boundary,
    joint_frozen,
    nbytes_per_sample,
    partition,
)
from frostline.engine.frozen.traced import Traced, trace
from frostline.engine.frozen.tracers import DrewWhileTracing, Tracer, ValueTracer, timm_no_trace

__all__ = [
    "DrewWhileTracing",
    "FrozenEffect",
    "FrozenWatch",
    "GraphError",
    "Partition",
    "RandomnessError",
    "Traced",
    "Tracer",
    "ValueTracer",
    "batch_size_of",
    "batch_statistics",
    "batch_statistics_op",
    "bridge",
    "call_model",
    "describe_boundary",
    "draw_reason",
    "fetch",
    "frozen_calls",
    "inputs_of",
    "joint_frozen",
    "mode_key",
    "module_at",
    "nbytes_per_sample",
    "partition",
    "probe_rows",
    "restored_state",
    "same_outputs",
    "stochastic_frozen",
    "strip_root",
    "take_rows",
    "timm_no_trace",
    "trace",
    "watch_frozen",
    "writes_in_place",
]
