"""Keras-style ``summary()`` tables with a trainable column."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from frostline.api.layer import Layer, OwnWeight
from frostline.core.leaves import is_module_leaf, own_named_weights
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


def example_dtype(module: nn.Module, input_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the example input: ``input_dtype``, else integers (``torch.long``) for a
    model whose first weighted layer is an Embedding, else the parameters' float dtype.

    >>> example_dtype(nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 2)), None)
    torch.int64
    """
    if input_dtype is not None:
        if not isinstance(input_dtype, torch.dtype):
            raise TypeError(
                "input_dtype must be a torch.dtype (e.g. torch.long), "
                f"got {type(input_dtype).__name__}: {input_dtype!r}"
            )
        return input_dtype
    first = next((m for m in module.modules() if is_module_leaf(m)), None)
    if isinstance(first, nn.Embedding | nn.EmbeddingBag):
        return torch.long
    param = next(module.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


def output_shapes(
    module: nn.Module,
    modules: Sequence[nn.Module],
    input_shape,
    input_dtype: torch.dtype | None = None,
) -> dict[int, str]:
    """Run one example through ``module`` (eval, no grad) and record each module's output shape."""
    shapes: dict[int, str] = {}
    handles = []

    def recorder(key: int):
        def hook(mod, args, out):
            shapes.setdefault(key, _shape_str(out))

        return hook

    dtype = example_dtype(module, input_dtype)
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    for m in modules:
        handles.append(m.register_forward_hook(recorder(id(m))))
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            module(example)
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        hint = (
            "pass input_dtype=torch.long if the model takes token ids"
            if dtype.is_floating_point
            else "pass input_dtype=torch.float32 if the model takes real values"
        )
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"summary ran the model on a {dtype} example of shape {tuple(example.shape)} and it "
            f"failed ({why}). Check input_shape (one sample, no batch axis), or {hint}"
        ) from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return shapes


def own_rows(layer: Layer) -> list[Layer]:
    """The weights ``layer``'s module owns beside its children, one row each.

    >>> class Scaled(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.scale = nn.Parameter(torch.ones(2)); self.lin = nn.Linear(2, 2)
    >>> [(r.name, r.class_name) for r in own_rows(Layer(Scaled()))]
    [('scale', 'Parameter')]
    """
    module = layer.module
    if next(module.children(), None) is None:
        return []
    base = layer.path
    return [
        OwnWeight(module, n, f"{base}.{n}" if base else n) for n, _ in own_named_weights(module)
    ]


def _rows(layer: Layer, depth: int | None, expand_nested: bool) -> list[tuple[int, Layer]]:
    rows: list[tuple[int, Layer]] = []
    if not len(layer.layers) and own_weights(layer.module):
        return [(0, layer)]  # a model that is one layer (fl.wrap(nn.Linear(4, 2))): its own row

    def walk(node: Layer, level: int) -> None:
        rows.extend((level, own) for own in own_rows(node))
        for child in node.layers:
            rows.append((level, child))
            nested_model = type(child) is not Layer  # a wrapped nested Model is one layer
            deeper = depth is None or level + 1 < depth
            if deeper and (expand_nested or not nested_model) and len(child.layers):
                walk(child, level + 1)

    walk(layer, 0)
    return rows


def row_counts(entries: list[tuple[int, Layer]], labels: list[str]) -> list[tuple[int, str | None]]:
    """Each row's parameter count with every tensor counted once: a tensor already counted
    by an earlier row that is not an ancestor (a tied weight) is left out and named.

    So the top-level rows add up to Total, and an expanded row's children add up to it.

    >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    >>> head.weight = emb.weight
    >>> rows = [(0, Layer(emb)), (0, Layer(head))]
    >>> row_counts(rows, ["emb", "head"])
    [(40, None), (0, '[40 params shared with emb]')]
    """
    out: list[tuple[int, str | None]] = []
    stack: list[set[int]] = [set()]
    first_row: dict[int, str] = {}
    for (level, layer), label in zip(entries, labels):
        del stack[level + 1 :]
        while len(stack) <= level:
            stack.append(set(stack[-1]))
        before = stack[level]
        weights = unique_tensors(layer.weights)
        fresh = [t for t in weights if id(t) not in before]
        shared = [t for t in weights if id(t) in before]
        for t in fresh:
            first_row[id(t)] = label  # the deepest row counting it (rows nest in order)
        stack[level] = before | {id(t) for t in fresh}
        stack.append(set(before))
        note = None
        if shared:
            owners = sorted({first_row.get(id(t), "an earlier row") for t in shared})
            note = f"[{sum(t.numel() for t in shared):,} params shared with {', '.join(owners)}]"
        out.append((sum(t.numel() for t in fresh), note))
    return out


def render(
    layer: Layer,
    *,
    depth: int | None = 1,
    expand_nested: bool = False,
    leaves: bool = False,
    input_shape: Sequence[int] | None = None,
    input_dtype: torch.dtype | None = None,
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
        shapes = output_shapes(
            layer.module,
            [e.module for _, e in entries if not isinstance(e, OwnWeight)],
            input_shape,
            input_dtype,
        )
    show_shape = bool(shapes)

    cols = ["Layer (type)"] + (["Output Shape"] if show_shape else []) + ["Param #", "Trainable"]
    table: list[list[str]] = []
    labels = [entry.path if leaves else (entry.path or entry.name) for _, entry in entries]
    numbers = row_counts(entries, labels)
    for i, ((level, entry), (n, note)) in enumerate(zip(entries, numbers)):
        label = entry.path if leaves else entry.name
        prefix = f"{i:>3}  " if leaves else "  " * level
        first = f"{prefix}{label} ({entry.class_name})" + (f" {note}" if note else "")
        own = isinstance(entry, OwnWeight)
        shape = "-" if own else shapes.get(id(entry.module), "-")
        row = [first] + ([shape] if show_shape else [])
        flag = ("Y" if entry.trainable else "N") if own else trainable_status(entry.module)
        row += [f"{n:,}", flag]
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
