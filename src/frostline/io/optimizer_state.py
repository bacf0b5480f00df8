"""Optimizer state as ``(tensors, JSON meta)`` pairs, without pickle.

:func:`optimizer_state_to_tensors` flattens ``optimizer.state_dict()`` into named
tensors (for safetensors) and plain JSON (everything else), keyed by parameter names
(:func:`parameter_names`) instead of positions; :func:`optimizer_state_from_tensors`
loads that back into an optimizer holding the same named parameters, bitwise exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from frostline.io.errors import CheckpointError
from frostline.io.jsondata import to_json_data

__all__ = ["optimizer_state_from_tensors", "optimizer_state_to_tensors", "parameter_names"]


def parameter_names(module: torch.nn.Module) -> dict[int, str]:
    """Map ``id(param) -> name`` for ``module.named_parameters()`` (the ``names`` argument).

    Tied parameters get the first name under which they appear.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> sorted(parameter_names(m).values())
        ['bias', 'weight']
    """
    return {id(p): n for n, p in module.named_parameters()}


def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer, names: Mapping[Any, str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``optimizer.state_dict()`` into ``(tensors, json_meta)`` without pickle.

    ``names`` maps each optimized parameter to a unique name; keys are ``id(param)``
    (see :func:`parameter_names`) or the parameter tensors themselves. Tensor state
    goes to ``tensors["state/<param name>/<key>"]`` (tensor-valued hyperparameters to
    ``"param_groups/<i>/<key>"``); ``json_meta["param_groups"]`` lists every group
    with ``params`` replaced by names and all hyperparameters as JSON (tuples such as
    ``betas`` become lists and are restored as tuples); non-tensor state entries
    (e.g. a python ``step``) go to ``json_meta["state"]``. The returned tensors are
    the optimizer's live buffers: serialize them before the next ``step()``.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> tensors, meta = optimizer_state_to_tensors(opt, parameter_names(m))
        >>> sorted(tensors)[:3]
        ['state/bias/exp_avg', 'state/bias/exp_avg_sq', 'state/bias/step']
        >>> meta["param_groups"][0]["params"], meta["param_groups"][0]["betas"]
        (['weight', 'bias'], [0.9, 0.999])
    """
    by_id: dict[int, str] = {}
    for key, name in names.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"parameter names must be non-empty str, got {name!r}")
        by_id[key if isinstance(key, int) and not isinstance(key, bool) else id(key)] = name
    sd = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    seen_names: dict[str, int] = {}
    for gi, (g_sd, live_group) in enumerate(zip(sd["param_groups"], optimizer.param_groups)):
        for index, param in zip(g_sd["params"], live_group["params"]):
            pname = by_id.get(id(param))
            if pname is None:
                raise ValueError(
                    f"optimizer param_groups[{gi}] holds a parameter of shape "
                    f"{tuple(param.shape)} that has no entry in `names` "
                    "(build names with parameter_names(model))"
                )
            if seen_names.setdefault(pname, index) != index:
                raise ValueError(f"two optimizer parameters share the name {pname!r}")
            index_to_name[index] = pname

    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    group_types: list[dict[str, str]] = []
    for gi, g_sd in enumerate(sd["param_groups"]):
        group: dict[str, Any] = {"params": [index_to_name[i] for i in g_sd["params"]]}
        types: dict[str, str] = {}
        for key, value in g_sd.items():
            if key == "params":
                continue
            if isinstance(value, torch.Tensor):
                tensors[f"param_groups/{gi}/{key}"] = value
                group[key] = None
                types[key] = "tensor"
            else:
                group[key] = to_json_data(value, f"optimizer param_groups[{gi}][{key!r}]")
                if isinstance(value, tuple):
                    types[key] = "tuple"
        groups.append(group)
        group_types.append(types)

    state_meta: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        if index not in index_to_name:
            raise ValueError(f"optimizer state refers to unknown parameter index {index}")
        name = index_to_name[index]
        keys: list[str] = []
        values: dict[str, Any] = {}
        for key, value in entry.items():
            if not isinstance(key, str):
                raise TypeError(f"optimizer state key {key!r} of {name!r} is not a str")
            keys.append(key)
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value
            else:
                values[key] = to_json_data(value, f"optimizer state[{name!r}][{key!r}]")
        state_meta[name] = {"keys": keys, "values": values}
    meta = {
        "format": "frostline.optimizer",
        "version": 1,
        "optimizer": type(optimizer).__name__,
        "param_groups": groups,
        "param_group_types": group_types,
        "state": state_meta,
    }
    return tensors, meta


def optimizer_state_from_tensors(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    params_by_name: Mapping[str, torch.Tensor],
) -> None:
    """Load state flattened by :func:`optimizer_state_to_tensors` into ``optimizer``.

    ``optimizer`` must hold the same named parameters (``params_by_name``, e.g.
    ``dict(model.named_parameters())``) in the same groups; the order inside a group
    may differ. Otherwise a :class:`CheckpointError` lists every difference. Saved
    hyperparameters (lr, betas, ...) replace the optimizer's, as with
    ``load_state_dict``; the round trip is bitwise exact. The optimizer never shares
    memory with ``tensors`` (they are copied).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> tensors, meta = optimizer_state_to_tensors(opt, parameter_names(m))
        >>> opt2 = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        >>> optimizer_state_from_tensors(opt2, tensors, meta, dict(m.named_parameters()))
        >>> opt2.param_groups[0]["lr"]
        0.1
    """
    if not isinstance(meta, Mapping) or meta.get("format") != "frostline.optimizer":
        raise CheckpointError("optimizer meta is not frostline.optimizer data")
    if meta.get("version") != 1:
        raise CheckpointError(f"unsupported optimizer meta version {meta.get('version')!r}")
    saved_groups = meta["param_groups"]
    group_types = meta.get("param_group_types") or [{} for _ in saved_groups]
    id_to_name = {id(p): n for n, p in params_by_name.items()}

    problems: list[str] = []
    target_names: list[list[str]] = []
    for gi, live_group in enumerate(optimizer.param_groups):
        names_here = []
        for param in live_group["params"]:
            name = id_to_name.get(id(param))
            if name is None:
                problems.append(
                    f"param_groups[{gi}]: optimizer parameter of shape {tuple(param.shape)} "
                    "is not in params_by_name"
                )
            else:
                names_here.append(name)
        target_names.append(names_here)
    if len(saved_groups) != len(target_names):
        problems.append(
            f"checkpoint has {len(saved_groups)} param group(s), optimizer has {len(target_names)}"
        )
    for gi, (saved, target) in enumerate(zip(saved_groups, target_names)):
        missing = [n for n in saved["params"] if n not in set(target)]
        extra = [n for n in target if n not in set(saved["params"])]
        if missing:
            problems.append(f"param_groups[{gi}]: in checkpoint but not in optimizer: {missing}")
        if extra:
            problems.append(f"param_groups[{gi}]: in optimizer but not in checkpoint: {extra}")
    if problems:
        raise CheckpointError(
            "optimizer does not match the checkpoint:\n  - " + "\n  - ".join(problems)
        )

    name_to_index: dict[str, int] = {}
    sd_groups = []
    for gi, (saved, target) in enumerate(zip(saved_groups, target_names)):
        types = group_types[gi]
        group: dict[str, Any] = {}
        for key, value in saved.items():
            if key in ("params", "param_names"):
                # param_names describes how the *target* was built (torch keeps its own)
                continue
            kind = types.get(key)
            if kind == "tensor":
                tkey = f"param_groups/{gi}/{key}"
                if tkey not in tensors:
                    raise CheckpointError(f"optimizer tensors lack {tkey!r}")
                group[key] = tensors[tkey]
            elif kind == "tuple":
                group[key] = tuple(value)
            else:
                group[key] = value
        group["params"] = []
        for name in target:
            name_to_index[name] = len(name_to_index)
            group["params"].append(name_to_index[name])
        sd_groups.append(group)

    state: dict[int, dict[str, Any]] = {}
    for name, entry in meta["state"].items():
        if name not in name_to_index:
            raise CheckpointError(f"optimizer state for {name!r}, which is in no param group")
        values = entry["values"]
        restored: dict[str, Any] = {}
        for key in entry["keys"]:
            if key in values:
                restored[key] = values[key]
            else:
                tkey = f"state/{name}/{key}"
                if tkey not in tensors:
                    raise CheckpointError(f"optimizer tensors lack {tkey!r}")
                t = tensors[tkey]
                # load_state_dict adopts tensors already on the right device without a
                # copy; clone those so the optimizer never aliases the caller's tensors.
                restored[key] = t.clone() if t.device == params_by_name[name].device else t
        state[name_to_index[name]] = restored
    optimizer.load_state_dict({"state": state, "param_groups": sd_groups})
