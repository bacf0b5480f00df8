"""Keras-style ``summary()`` tables with a trainable column."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from frostline.api.layer import Layer
from frostline.core.state import module_flag, own_weights, unique_tensors


def format_size(nbytes: float) -> str:
    """Keras' size format: ``format_size(2048) == '2.00 KB'``."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} GB"  # pragma: no cover


@dataclass
class Counts:
    total: int
    trainable: int
    non_trainable: int
    total_bytes: int
    trainable_bytes: int
    non_trainable_bytes: int
    frozen_param_bytes: int


def counts(module: nn.Module) -> Counts:
    """Total / trainable / non-trainable scalars (shared tensors once) and their bytes."""
    weights = unique_tensors(t for m in module.modules() for t in own_weights(m))
    trainable_ids = {id(p) for p in module.parameters() if p.requires_grad}
    param_ids = {id(p) for p in module.parameters()}
    tr = [t for t in weights if id(t) in trainable_ids]
    nt = [t for t in weights if id(t) not in trainable_ids]
    frozen_params = [t for t in nt if id(t) in param_ids]

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    return Counts(
        total=sum(t.numel() for t in weights),
        trainable=sum(t.numel() for t in tr),
        non_trainable=sum(t.numel() for t in nt),
        total_bytes=nbytes(weights),
        trainable_bytes=nbytes(tr),
        non_trainable_bytes=nbytes(nt),
        frozen_param_bytes=nbytes(frozen_params),
    )


def trainable_status(module: nn.Module) -> str:
    """``Y`` (all parameters train), ``N`` (none), ``k/n`` (partly), flag for weightless layers."""

    params = unique_tensors(module.parameters())
    if not params:
        return "Y" if module_flag(module) else "N"
    on = sum(p.requires_grad for p in params)
    if on == len(params):
        return "Y"
    if on == 0:
        return "N"
    return f"{on}/{len(params)}"


def _shape_str(out) -> str:
    if isinstance(out, torch.Tensor):
        return str((None, *out.shape[1:]))
    if isinstance(out, dict):
        return "{" + ", ".join(f"{k}: {_shape_str(v)}" for k, v in out.items()) + "}"
    if isinstance(out, list | tuple):
        return "[" + ", ".join(_shape_str(v) for v in out) + "]"
    return "?"


def output_shapes(module: nn.Module, modules: Sequence[nn.Module], input_shape) -> dict[int, str]:
    """Run one example through ``module`` (eval, no grad) and record each module's output shape."""
    shapes: dict[int, str] = {}
    handles = []

    def recorder(key: int):
        def hook(mod, args, out):
            shapes.setdefault(key, _shape_str(out))

        return hook

    for m in modules:
        handles.append(m.register_forward_hook(recorder(id(m))))
    modes = {m: m.training for m in module.modules()}
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        example = torch.zeros((1, *input_shape), device=device, dtype=dtype)
        module.eval()
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return shapes


def _rows(layer: Layer, depth: int | None, expand_nested: bool) -> list[tuple[int, Layer]]:
    rows: list[tuple[int, Layer]] = []

    def walk(node: Layer, level: int) -> None:
        for child in node.layers:
            rows.append((level, child))
            nested_model = type(child) is not Layer  # a wrapped nested Model is one layer
            deeper = depth is None or level + 1 < depth
            if deeper and (expand_nested or not nested_model):
                walk(child, level + 1)

    walk(layer, 0)
    return rows


def render(
    layer: Layer,
    *,
    depth: int | None = 1,
    expand_nested: bool = False,
    leaves: bool = False,
    input_shape: Sequence[int] | None = None,
    line_length: int = 100,
    optimizer_line: str | None = None,
    savings_line: str | None = None,
) -> str:
    """The summary table as a string (see :meth:`frostline.Model.summary`)."""
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise ValueError(f"depth must be a positive int or None (everything), got {depth!r}")
    if leaves:
        entries = [(0, leaf) for leaf in layer.leaf_layers()]
    else:
        entries = _rows(layer, depth, expand_nested)
    shapes: dict[int, str] = {}
    if input_shape is not None:
        shapes = output_shapes(layer.module, [e.module for _, e in entries], input_shape)
    show_shape = bool(shapes)

    cols = ["Layer (type)"] + (["Output Shape"] if show_shape else []) + ["Param #", "Trainable"]
    table: list[list[str]] = []
    for i, (level, entry) in enumerate(entries):
        label = entry.path if leaves else entry.name
        prefix = f"{i:>3}  " if leaves else "  " * level
        first = f"{prefix}{label} ({entry.class_name})"
        n = entry.count_params()
        row = [first] + ([shapes.get(id(entry.module), "-")] if show_shape else [])
        row += [f"{n:,}", trainable_status(entry.module)]
        table.append(row)

    widths = [len(c) for c in cols]
    for row in table:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    widths[0] = max(widths[0], line_length - sum(widths[1:]) - 3 * (len(cols) - 1))

    def fmt(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        for j, c in enumerate(row[1:], start=1):
            is_num = cols[j] == "Param #"
            cells.append(c.rjust(widths[j]) if is_num else c.ljust(widths[j]))
        return "   ".join(cells).rstrip()

    width = sum(widths) + 3 * (len(cols) - 1)
    c = counts(layer.module)
    lines = [f'Model: "{layer.name}"', "_" * width, fmt(cols), "=" * width]
    for j, row in enumerate(table):
        lines.append(fmt(row))
        if j != len(table) - 1 and entries[j + 1][0] == 0:
            lines.append("-" * width if not leaves else "")
    lines = [ln for ln in lines if ln != ""]
    lines.append("=" * width)
    lines.append(f"Total params: {c.total:,} ({format_size(c.total_bytes)})")
    lines.append(f"Trainable params: {c.trainable:,} ({format_size(c.trainable_bytes)})")
    lines.append(
        f"Non-trainable params: {c.non_trainable:,} ({format_size(c.non_trainable_bytes)})"
    )
    if optimizer_line:
        lines.append(optimizer_line)
    if savings_line:
        lines.append(savings_line)
    lines.append("_" * width)
    return "\n".join(lines)


def print_summary(text: str, print_fn: Callable[[str], object] | None) -> None:
    (print_fn or print)(text)
