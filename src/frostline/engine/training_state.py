"""Checkpoints written by ``fit(checkpoint_dir=...)`` and exact resume with ``fit(resume=...)``.

A checkpoint holds the weights, the trainable state of every layer, the optimizer's
param groups and state, the learning-rate scale and scheduler position, the epoch,
the shuffling seed, every callback's state (History included; tensors such as
EarlyStopping's best weights in ``callbacks.safetensors``) and the RNG states.
Resuming a run stopped after epoch k gives, on CPU, bitwise the weights of the run
that was never stopped — with the same layers frozen as when it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from frostline._version import __version__
from frostline.core.freezing import apply_trainable_state, trainable_state
from frostline.core.lora import apply_lora_state
from frostline.io.checkpoint import (
    CheckpointManager,
    check_keys,
    load_checkpoint,
    resolve_checkpoint,
)
from frostline.io.errors import CheckpointError
from frostline.io.rng_state import capture_rng, restore_rng


def callback_state(resume, class_name: str) -> dict[str, Any] | None:
    """The saved state of the first callback named ``class_name`` in the newest complete
    checkpoint under ``resume`` (None when it had none); no tensors are read.

    >>> import tempfile
    >>> callback_state(tempfile.mkdtemp(), "EarlyStopping")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    CheckpointError: no complete checkpoint
    """
    state = json.loads((resolve_checkpoint(resume) / "state.json").read_text())
    for entry in state.get("callbacks", []):
        if entry.get("class") == class_name:
            return dict(entry.get("state") or {})
    return None


class CheckpointWriter:
    """Saves one checkpoint per epoch into a run directory, keeping the last N and the best."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 3,
        monitor: str = "val_loss",
        mode: str = "min",
    ) -> None:
        self.manager = CheckpointManager(directory, keep_last=keep_last, monitor=monitor, mode=mode)

    def save(
        self,
        model,
        epoch: int,
        logs: dict,
        cblist,
        *,
        shuffle_seed: int,
        ever_trainable: set[int],
        batch: int | None = None,
        objective: dict | None = None,
    ) -> Path:
        """Checkpoint the run after ``epoch`` (or, with ``batch``, after that batch of it,
        with the epoch's running loss and metric sums in ``objective``)."""
        tensors, state = snapshot(
            model, cblist, shuffle_seed=shuffle_seed, ever_trainable=ever_trainable, epoch=epoch
        )
        if batch is not None:
            state["batch"], state["objective"] = batch, objective
        return self.manager.save(
            epoch,
            tensors,
            state,
            {k: float(v) for k, v in logs.items() if isinstance(v, int | float)},
        )

    def latest(self) -> Path | None:
        """The newest complete checkpoint (None when there is none yet)."""
        return self.manager.latest() if self.manager.directory.is_dir() else None


def snapshot(
    model, cblist, *, shuffle_seed: int, ever_trainable: set[int], epoch: int
) -> tuple[dict, dict]:
    """``(tensor groups, JSON state)`` describing the run after ``epoch``."""

    module = model.module
    names = {id(p): n for n, p in module.named_parameters()}
    tensors: dict[str, dict[str, torch.Tensor]] = {"model": dict(module.state_dict())}
    live = model.live_optimizer
    state: dict[str, Any] = {
        "frostline_version": __version__,
        "epoch": epoch,
        "shuffle_seed": shuffle_seed,
        "trainable": trainable_state(module),
        "callbacks": cblist.states(),
        "ever_trainable_names": sorted(names[i] for i in ever_trainable if i in names),
    }
    if live is not None and live.optimizer is not None:
        tensors["optimizer"], meta = live.state_dict()
        state["optimizer"] = meta.pop("optimizer")
        state["live"] = meta
    callback_tensors = cblist.tensors()
    if callback_tensors:  # EarlyStopping's best weights, ...
        tensors["callbacks"] = {k: v.detach().contiguous() for k, v in callback_tensors.items()}
    rng_tensors, rng_meta = capture_rng()
    tensors["rng"] = rng_tensors
    state["rng"] = rng_meta
    return tensors, state


def restore(model, resume, cblist) -> dict[str, Any]:
    """Load the newest complete checkpoint under ``resume`` into ``model`` and the callbacks."""
    ckpt = load_checkpoint(resume)
    module = model.module
    weights = ckpt.tensors.get("model", {})
    try:  # LoRA layers first (adapters are weights of the model)
        apply_lora_state(module, ckpt.state.get("trainable", {}).get("lora"))
    except KeyError as e:
        raise CheckpointError(f"checkpoint {ckpt.path}: {e.args[0]}") from None
    check_keys(module, weights, f"checkpoint {ckpt.path}")
    with torch.no_grad():
        module.load_state_dict(weights)
    state = ckpt.state
    try:
        apply_trainable_state(module, state["trainable"])
    except KeyError as e:
        raise CheckpointError(e.args[0]) from None
    live = model.live_optimizer
    if live is not None and "optimizer" in state:
        try:
            live.load_state_dict(
                ckpt.tensors.get("optimizer", {}),
                {**state["live"], "optimizer": state["optimizer"]},
            )
        except KeyError as e:
            raise CheckpointError(f"checkpoint {ckpt.path}: {e.args[0]}") from None
    cblist.restore(state.get("callbacks", []), ckpt.tensors.get("callbacks", {}))
    restore_rng(ckpt.tensors.get("rng", {}), state.get("rng", {}))
    return state
