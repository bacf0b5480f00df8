"""``model.export(path, format=...)``: the model as an ONNX file or a ``torch.export`` program.

What is exported is the model as it runs for inference: a copy of it (the model itself is
not changed) with every LoRA adapter merged into its kernel, in eval mode (dropout off,
BatchNorm on running statistics) and each BatchNorm that follows a conv folded into it.
The batch dimension stays dynamic. The export is checked before it is written: the
exported program (and, for ONNX, an onnxruntime session where onnxruntime is installed)
must reproduce the unfolded copy's outputs on the example. Files are written atomically.

``format="torch"`` saves an ``ExportedProgram`` with ``torch.export.save`` (load it with
``torch.export.load(path).module()``); ``format="onnx"`` uses ``torch.onnx.export`` (the
dynamo exporter: ``pip install "frostline[export]"`` installs onnx, onnxscript and
onnxruntime).

>>> import tempfile, torch, frostline as fl
>>> from torch import nn
>>> model = fl.Sequential([nn.Linear(4, 3)])
>>> path = model.export(tempfile.mkdtemp() + "/m.pt2", format="torch", input_shape=(4,))
>>> program = torch.export.load(path).module()
>>> tuple(program(torch.zeros(5, 4)).shape)
(5, 3)
"""

from __future__ import annotations

import copy
import importlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from frostline.api.summary import example_dtype
from frostline.core import lora as core_lora
from frostline.engine.fuse import fold_batchnorm
from frostline.io.atomic import atomic_write_bytes

__all__ = ["FORMATS", "ExportError", "export", "inference_module"]

#: format -> the file suffix it is written with
FORMATS = {"onnx": ".onnx", "torch": ".pt2"}


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not reproduce the model."""


def inference_module(module: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``module`` as it is exported: LoRA merged, eval mode, conv->BatchNorm folded,
    no parameter requiring grad; and the folded ``(conv, bn)`` paths. ``module`` is untouched.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    >>> _ = net(torch.zeros(1, 3, 5, 5))
    >>> copy_, folded = inference_module(net)
    >>> folded, net.training, copy_.training
    ([('0', '1')], True, False)
    """
    dup = copy.deepcopy(module)
    for m in dup.modules():
        if core_lora.is_lora(m):
            core_lora.merge(m)
    dup.eval()
    dup.requires_grad_(False)
    return dup, fold_batchnorm(dup)


def _example(
    module: nn.Module,
    example: Any,
    input_shape: Sequence[int] | None,
    input_dtype: torch.dtype | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to trace with: ``example`` (a tensor or array, a tuple of them, or a
    dict of keyword inputs), else zeros of ``(2, *input_shape)``."""
    if (example is None) == (input_shape is None):
        raise ValueError(
            "export needs exactly one of example= (a batch of inputs) or input_shape= (one "
            f"sample's shape, e.g. (3, 224, 224)); got example={'None' if example is None else 'a value'}, "
            f"input_shape={input_shape!r}"
        )
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if input_shape is not None:
        if not isinstance(input_shape, Sequence) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape
        ):
            raise ValueError(
                f"input_shape must be a sequence of positive ints (one sample, no batch axis), got {input_shape!r}"
            )
        dtype = example_dtype(module, input_dtype)
        # batch 2: torch.export specialises a dimension of size 0 or 1
        return (torch.zeros((2, *input_shape), dtype=dtype, device=device),), {}

    def tensor(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return torch.from_numpy(v).to(device)
        if isinstance(v, torch.Tensor):
            return v.to(device)
        raise TypeError(f"example values must be tensors or NumPy arrays, got {type(v).__name__}")

    if isinstance(example, dict):
        return (), {str(k): tensor(v) for k, v in example.items()}
    if isinstance(example, tuple | list):
        return tuple(tensor(v) for v in example), {}
    return (tensor(example),), {}


def _dynamic_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    batch = torch.export.Dim("batch", min=1)

    def spec(v: Any) -> Any:
        return {0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(v) for v in args)


def _flat(out: Any) -> list[torch.Tensor]:
    """The tensors of an output (a ModelOutput or dict by value, in order)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _check(
    got: Sequence[Any], want: Sequence[torch.Tensor], what: str, rtol: float, atol: float
) -> None:
    if len(got) != len(want):
        raise ExportError(f"{what} gives {len(got)} outputs; the model gives {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.as_tensor(np.asarray(g)) if not isinstance(g, torch.Tensor) else g
        w = w.detach().cpu()
        if tuple(g.shape) != tuple(w.shape) or not torch.allclose(
            g.cpu().to(w.dtype), w, rtol=rtol, atol=atol
        ):
            diff = (
                float((g.cpu().to(w.dtype) - w).abs().max())
                if g.shape == w.shape
                else f"shape {tuple(g.shape)} vs {tuple(w.shape)}"
            )
            raise ExportError(
                f"{what} does not reproduce the model: output {i} differs by {diff} "
                f"(allowed rtol={rtol}, atol={atol})"
            )


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise ExportError(
            f'format="onnx" needs {name}, which is not installed: pip install "frostline[export]"'
        ) from None


def export(
    model: Any,
    path: str | os.PathLike,
    format: str = "onnx",
    *,
    example: Any = None,
    input_shape: Sequence[int] | None = None,
    input_dtype: torch.dtype | None = None,
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Path:
    """Export ``model`` (a frostline Model or an ``nn.Module``) to ``path``; returns the path.

    ``format``: ``"onnx"`` (``path`` ends in ``.onnx``) or ``"torch"`` (``.pt2``). Give one
    batch of inputs as ``example`` (a tensor or array, a tuple of them, or a dict of keyword
    inputs) or one sample's shape as ``input_shape`` (zeros of ``input_dtype``, by default
    ``torch.long`` for a model that starts with an Embedding, else the weights' dtype). With
    ``dynamic_batch`` the exported batch size is free. The export must reproduce the model
    on the example within ``rtol``/``atol`` (else :class:`ExportError`, nothing written).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    path = Path(path)
    if path.suffix != FORMATS[format]:
        raise ValueError(f'format="{format}" files end in {FORMATS[format]}, got {str(path)!r}')
    if not path.parent.is_dir():
        raise ValueError(
            f"cannot export to {str(path)!r}: the folder {str(path.parent)!r} does not exist"
        )
    module = (
        model.module if hasattr(model, "module") and not isinstance(model, nn.Module) else model
    )
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"export takes a frostline Model or a torch.nn.Module, got {type(model).__name__}"
        )
    if format == "onnx":
        _require("onnx")
        _require("onnxscript")
    dup, _ = inference_module(module)
    args, kwargs = _example(dup, example, input_shape, input_dtype)
    want = _reference(module, args, kwargs)
    dynamic = _dynamic_batch(args, kwargs) if dynamic_batch else None
    if format == "torch":
        try:
            program = torch.export.export(dup, args, kwargs or None, dynamic_shapes=dynamic)
        except Exception as e:
            raise ExportError(_why("torch.export", e, dynamic_batch)) from e
        with torch.no_grad():
            _check(
                _flat(program.module()(*args, **kwargs)), want, "the exported program", rtol, atol
            )
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        atomic_write_bytes(path, buffer.getbuffer())
        return path
    try:
        onnx_program = torch.onnx.export(
            dup, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic, verbose=False
        )
    except Exception as e:
        raise ExportError(_why("torch.onnx.export", e, dynamic_batch)) from e
    assert onnx_program is not None  # dynamo=True returns the program
    data = onnx_program.model_proto.SerializeToString()
    try:
        ort = importlib.import_module("onnxruntime")
    except ModuleNotFoundError:
        ort = None
    if ort is not None:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if kwargs and all(n in kwargs for n in names):
            feeds = {n: kwargs[n].detach().cpu().numpy() for n in names}
        else:
            flat = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}
        _check(session.run(None, feeds), want, "the ONNX model (onnxruntime)", rtol, atol)
    atomic_write_bytes(path, data)
    return path


def _reference(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The model's own outputs in inference mode (LoRA unmerged, nothing folded); its
    modules' modes are restored."""
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            return _flat(module(*args, **kwargs))
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        shapes = [
            tuple(t.shape)
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        ]
        raise ExportError(
            f"the model could not run on the example (inputs of shapes {shapes}: "
            f"{_why_short(e)}); check example= or input_shape= (one sample, no batch axis)"
        ) from e
    finally:
        for m, mode in modes.items():
            m.training = mode


def _why_short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _why(tool: str, e: BaseException, dynamic_batch: bool) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    hint = " If the model fixes its batch size, pass dynamic_batch=False." if dynamic_batch else ""
    return f"{tool} could not export the model ({type(e).__name__}: {first}).{hint}"
