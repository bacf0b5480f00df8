"""frostline's freezing workflows inside the Hugging Face ``transformers.Trainer``.

The Trainer builds its optimizer once, from the parameters that require grad at that
moment: a layer unfrozen later never trains. :class:`FreezeCallback` fixes that and
runs :mod:`frostline.freezing` (freeze at start, unfreeze at an epoch, gradual
unfreezing, discriminative rates, progressive freezing) inside ``trainer.train()``:

* newly unfrozen parameters join ``trainer.optimizer`` as new groups, at their own
  rate, with the options of the optimizer's group they would have belonged to, by the
  Trainer's weight-decay rule (no decay for biases and norms); their
  rate follows the Trainer's LR scheduler (warm-up, linear/cosine decay), whose own
  groups are left as it built them;
* frozen parameters leave the optimizer (state and ``.grad`` dropped) and stay bitwise;
* frozen BatchNorm runs in inference mode across ``model.train()``;
* with several processes (``torchrun``, DDP on gloo or NCCL) the gradients of layers
  unfrozen after the Trainer built its DDP wrapper are averaged over the processes
  (:class:`LateGradients`), so the processes stay in step;
* weights frozen at the start and never unfrozen are verified when training ends;
* ``trainer.train(resume_from_checkpoint=...)`` continues with the trainable state, the
  schedules' state and the optimizer state (of unfrozen layers too) the run stopped with.
  The Trainer's ``optimizer.pt`` stays loadable by a plain Trainer: its groups are the
  ones the Trainer built; frostline's full layout rides along under a ``"frostline"`` key.

Freezing given with ``freeze=`` happens when the Trainer is constructed (before it
builds its optimizer). Resuming expects the checkpoint under ``args.output_dir``
(``checkpoint-<step>``, where the Trainer writes it) and the default
``restore_callback_states_from_checkpoint=False`` (the callback restores itself).

Needs ``transformers`` and ``accelerate`` (``pip install frostline[huggingface]``).

>>> import frostline as fl
>>> FreezeCallback([fl.freezing.UnfreezeAt(1, "bert.encoder")], freeze="bert")
FreezeCallback(schedules=['UnfreezeAt'], freeze='bert')
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from frostline.api.callbacks import Callback
from frostline.engine.tracking import GroupOptions, like_groups
from frostline.integrations.driver import DriverViews, FreezeDriver, epoch_of

__all__ = ["FreezeCallback"]

OPTIMIZER_FILE = "optimizer.pt"
_KEY = "frostline"


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"FreezeCallback needs the Trainer's torch optimizer, got {type(optimizer).__name__}"
        )
    return inner


def trainer_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> GroupOptions:
    """Options of the optimizer's group a parameter would have belonged to, the Trainer's
    decay rule (no decay for biases and norms) telling the kinds apart.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 2))
    >>> opt = torch.optim.AdamW([{"params": [net[2].weight], "weight_decay": 0.1},
    ...                          {"params": [net[2].bias], "weight_decay": 0.0}])
    >>> rule = trainer_groups(opt, net)
    >>> [rule(n, p)["weight_decay"] for n, p in [("0.weight", net[0].weight), ("1.weight", net[1].weight)]]
    [0.1, 0.0]
    """
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    return like_groups(optimizer, model, kind=lambda name, p: name in decay)


class LateGradients:
    """All-reduce, across processes, the gradients of parameters the DDP wrapper was built without.

    The Trainer wraps the model in DDP once, over the parameters that require grad then;
    a layer unfrozen later would train on each process's own gradients and the processes
    would drift apart. Each such parameter gets a hook that averages its gradient over the
    processes as soon as backward has accumulated it (on a process group of its own, before
    gradient clipping and the optimizer step see it).
    """

    def __init__(self, model: nn.Module) -> None:
        self.world = dist.get_world_size()
        self.known = {id(p) for p in model.parameters() if p.requires_grad}
        group = dist.new_group()
        assert isinstance(group, dist.ProcessGroup)  # every process is in it
        self.group = group
        self.hooks: dict[int, Any] = {}

    def update(self, model: nn.Module) -> None:
        """Hook every trainable parameter DDP does not reduce (same order on every process)."""
        for p in model.parameters():
            if p.requires_grad and id(p) not in self.known and id(p) not in self.hooks:
                self.hooks[id(p)] = p.register_post_accumulate_grad_hook(self._reduce)

    def _reduce(self, p: torch.Tensor) -> None:
        assert p.grad is not None
        dist.all_reduce(p.grad, group=self.group)
        p.grad.div_(self.world)

    def remove(self) -> None:
        for hook in self.hooks.values():
            hook.remove()
        self.hooks = {}


class FreezeCallback(DriverViews, TrainerCallback, ExportableState):
    """Freezing schedules for ``transformers.Trainer`` (see the module docstring).

    ``schedules``: frostline schedule callbacks; layer names are paths inside the
    model (``"bert.encoder.layer.3"``). ``freeze``: layers to freeze when the Trainer is
    built (a glob, a list or an ``fl.select`` selector). ``verify``: ``"raise"``
    (default), ``"warn"`` or False. ``lr``: rate of unfrozen parameters without their
    own (default: the Trainer's ``learning_rate``). ``group_options``: ``(name, param)
    -> dict`` for the groups they join (default: the options of the optimizer's group
    they would have belonged to, the Trainer's weight-decay rule telling biases and norms
    apart). ``keep_frozen``: layers you froze by hand before building the Trainer stay
    frozen when a schedule unfreezes a layer above them (default False: unfreezing a
    parent, e.g. ``UnfreezeAt(1, "bert")``, unfreezes all below it, as in Keras).
    """

    def __init__(
        self,
        schedules: Sequence[Callback] | Callback | None = (),
        *,
        freeze: Any = None,
        verify: str | bool = "raise",
        lr: float | None = None,
        group_options: GroupOptions | None = None,
        keep_frozen: bool = False,
    ) -> None:
        self.driver = FreezeDriver(schedules, freeze=freeze, verify=verify, keep_frozen=keep_frozen)
        self.lr = lr
        self.group_options = group_options
        self._base: list[list[torch.Tensor]] = []
        self._projection: Any = None
        self._late: LateGradients | None = None
        self._epoch = 0
        #: what the last resume restored: "none", "full" or "layout only"
        self.resumed = "none"

    # -- Trainer events -----------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                "FreezeCallback restores itself on resume; with "
                "restore_callback_states_from_checkpoint=True the Trainer would replace it by a "
                "copy without its schedules. Leave that argument at its default (False)."
            )
        if model is not None:
            self.driver.bind(model)

    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs
    ):
        if model is None or optimizer is None:
            raise RuntimeError(
                "FreezeCallback: the Trainer passed no model or optimizer to on_train_begin"
            )
        self.driver.bind(model)
        if self._late is not None:
            self._late.remove()
        # several processes: DDP was built over what is trainable now (before a resume's state)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._late = LateGradients(model) if distributed else None
        inner = _unwrap(optimizer)
        self._base = [list(g["params"]) for g in inner.param_groups]  # as the Trainer built them
        full = None
        self.resumed = "none"
        if state.global_step > 0:
            saved = self._saved_state(state)
            if saved is not None and saved.get("layout") is not None:
                self.driver.restore(saved)
                full = self._full_optimizer_state(args, state, saved["layout"])
                self.resumed = "full" if full is not None else "layout only"
                if full is None:
                    self.driver.restored = {**saved, "layout": None}
        rule = self.group_options or trainer_groups(inner, model)
        self.driver.attach(inner, lr=self.lr, group_options=rule, scheduler=lr_scheduler)
        if full is not None:
            inner.load_state_dict(full)
        if self._projection is not None:
            self._projection.remove()
        self._projection = inner.register_state_dict_post_hook(self._project)
        self._epoch = epoch_of(state.epoch or 0)
        self.driver.start(self._epoch)
        self.driver.restored = None
        self._reduce_late()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = epoch_of(state.epoch or 0)
        self.driver.epoch_begin(self._epoch)
        self._reduce_late()

    def on_epoch_end(self, args, state, control, **kwargs):
        logs = state.log_history[-1] if state.log_history else {}
        self.driver.epoch_end(self._epoch, logs)
        self._reduce_late()

    def _reduce_late(self) -> None:
        if self._late is not None and self.driver.model is not None:
            self._late.update(self.driver.model.module)

    def on_train_end(self, args, state, control, **kwargs):
        try:
            self.driver.finish()
        finally:
            self.driver.remove()
            if self._late is not None:
                self._late.remove()
                self._late = None
            if self._projection is not None:
                self._projection.remove()
                self._projection = None

    # -- checkpoints --------------------------------------------------------------------
    def state(self) -> dict:
        """What the Trainer stores in ``trainer_state.json`` (JSON-able)."""
        saved = self.driver.state() if self.driver.model is not None else None
        return {"args": {}, "attributes": {"frostline_state": saved}}

    @staticmethod
    def _saved_state(state) -> dict | None:
        entry = (state.stateful_callbacks or {}).get("FreezeCallback")
        if isinstance(entry, list):
            entry = entry[0] if entry else None
        if not isinstance(entry, dict):
            return None
        return (entry.get("attributes") or {}).get("frostline_state")

    def _full_optimizer_state(self, args, state, layout: list) -> dict | None:
        path = os.path.join(
            args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", OPTIMIZER_FILE
        )
        problem = None
        if not os.path.isfile(path):
            problem = f"{path} does not exist"
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            extra = sd.get(_KEY) if isinstance(sd, dict) else None
            if not isinstance(extra, dict) or extra.get("layout") != layout:
                problem = f"{path} was not written with this run's frostline state"
            else:
                return extra["state"]
        warnings.warn(
            f"frostline: resuming at step {state.global_step} with the trainable state of the checkpoint, "
            f"but {problem}: parameters unfrozen during training restart with fresh optimizer state",
            RuntimeWarning,
            stacklevel=2,
        )
        return None

    def _project(self, optimizer: torch.optim.Optimizer, sd: dict) -> dict:
        """The optimizer's state dict in the groups the Trainer built, full state under ``"frostline"``."""
        index: dict[int, int] = {}
        for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
            for p, i in zip(group["params"], saved["params"]):
                index[id(p)] = i
        groups, state, k = [], {}, 0
        for gi, params in enumerate(self._base):
            entry = {key: v for key, v in sd["param_groups"][gi].items() if key != "params"}
            entry["params"] = list(range(k, k + len(params)))
            for p in params:
                i = index.get(id(p))
                if i is not None and i in sd["state"]:
                    state[k] = sd["state"][i]
                k += 1
            groups.append(entry)
        tracker = self.driver.tracker
        layout = tracker.layout() if tracker is not None else None
        return {"state": state, "param_groups": groups, _KEY: {"layout": layout, "state": sd}}

    def __repr__(self) -> str:
        return (
            f"FreezeCallback(schedules={[type(s).__name__ for s in self.driver.schedules]}, "
            f"freeze={self.driver.freeze!r})"
        )
