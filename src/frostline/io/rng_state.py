"""RNG state (python, numpy, torch CPU and CUDA) as ``(tensors, JSON meta)`` pairs."""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from frostline.io.errors import CheckpointError, CheckpointWarning

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture python ``random``, numpy's global RandomState, torch CPU and all CUDA RNGs.

    Returns ``(tensors, json_meta)`` for :func:`restore_rng` (or a checkpoint).

    Example:
        >>> import random
        >>> tensors, meta = capture_rng()
        >>> a = random.random()
        >>> restore_rng(tensors, meta)
        >>> random.random() == a
        True
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tensors = {
        "python/state": torch.tensor(internal, dtype=torch.int64),
        "numpy/keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
        "torch/cpu": torch.get_rng_state(),
    }
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, s in enumerate(cuda_states):
        tensors[f"cuda/{i}"] = s.cpu()
    meta = {
        "format": "frostline.rng",
        "version": 1,
        "python": {"version": version, "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(np_name),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "cuda": {"device_count": len(cuda_states)},
    }
    return tensors, meta


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Restore RNG state captured by :func:`capture_rng` (all or nothing).

    Everything is validated before any generator is touched. CUDA states for
    devices that do not exist here are skipped with a warning.

    Example:
        >>> import numpy as np
        >>> tensors, meta = capture_rng()
        >>> a = np.random.rand()
        >>> restore_rng(tensors, meta)
        >>> np.random.rand() == a
        True
    """
    if not isinstance(meta, Mapping) or meta.get("format") != "frostline.rng":
        raise CheckpointError("rng meta is not frostline.rng data")
    missing = [k for k in ("python/state", "numpy/keys", "torch/cpu") if k not in tensors]
    n_cuda = int(meta.get("cuda", {}).get("device_count", 0))
    missing += [f"cuda/{i}" for i in range(n_cuda) if f"cuda/{i}" not in tensors]
    if missing:
        raise CheckpointError(f"rng tensors lack {missing}")
    py = tensors["python/state"]
    keys = tensors["numpy/keys"]
    cpu = tensors["torch/cpu"]
    expected = {
        "python/state": (py, torch.int64, len(random.getstate()[1])),
        "numpy/keys": (keys, torch.int64, 624),
        "torch/cpu": (cpu, torch.uint8, torch.get_rng_state().numel()),
    }
    for key, (t, dtype, n) in expected.items():
        if t.dtype != dtype or tuple(t.shape) != (n,):
            raise CheckpointError(
                f"rng tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} ({n},)"
            )
    py_state = (meta["python"]["version"], tuple(py.tolist()), meta["python"]["gauss_next"])
    npm = meta["numpy"]
    np_state = (
        npm["bit_generator"],
        keys.numpy().astype(np.uint32),
        npm["pos"],
        npm["has_gauss"],
        npm["cached_gaussian"],
    )
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu.cpu())
    for i in range(min(n_cuda, available)):
        torch.cuda.set_rng_state(tensors[f"cuda/{i}"].cpu(), i)
    if n_cuda > available:
        warnings.warn(
            f"rng state has {n_cuda} CUDA device(s), this machine has {available}; "
            f"CUDA RNG of devices {list(range(available, n_cuda))} not restored",
            CheckpointWarning,
            stacklevel=2,
        )
