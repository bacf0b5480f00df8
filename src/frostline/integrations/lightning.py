"""frostline's freezing workflows inside ``lightning.Trainer``.

:class:`FreezeCallback` runs :mod:`frostline.schedules` (freeze at start, unfreeze at
an epoch, gradual unfreezing, discriminative rates, progressive freezing) in a
Lightning fit:

* the trainer's optimizer follows the trainable set: unfrozen parameters join it as
  new groups at their own rate (no param-group plumbing in your LightningModule, unlike
  ``BaseFinetuning``), frozen ones leave it with their state and ``.grad``;
* frozen BatchNorm runs in inference mode although Lightning calls ``.train()``;
* under ``strategy="ddp"`` the DDP wrapper is rebuilt, on every rank at once, whenever
  the trainable set changes (DDP only reduces what required grad when it was built);
* weights frozen at the start and never unfrozen are verified bitwise when fit ends;
* the callback's ``state_dict`` carries the trainable state and the optimizer's group
  layout, so ``trainer.fit(..., ckpt_path=...)`` resumes exactly where the run stopped
  (the optimizer state of unfrozen layers included).

Needs the ``lightning`` package (``pip install frostline[lightning]``).

>>> import frostline as fl
>>> cb = FreezeCallback([fl.schedules.UnfreezeAt(2, "backbone")], freeze="backbone")
>>> cb
FreezeCallback(schedules=['UnfreezeAt'], freeze='backbone')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback as LightningCallback
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from frostline.api.callbacks import Callback
from frostline.core.checks import require_int
from frostline.engine.tracking import GroupOptions, named_trainable
from frostline.integrations.driver import DriverViews, FreezeDriver

__all__ = ["FreezeCallback"]


class FreezeCallback(DriverViews, LightningCallback):
    """Freezing schedules for ``lightning.Trainer`` (see the module docstring).

    ``schedules``: frostline schedule callbacks; their layer names are paths inside
    your LightningModule (``"backbone"``, ``"backbone.layer4"``). ``freeze``: layers to
    freeze when fit starts (a glob, a list or an ``fl.select`` selector). ``verify``:
    ``"raise"`` (default), ``"warn"`` or False. ``optimizer_index``: which of the
    trainer's optimizers newly unfrozen parameters join. ``lr``: their rate when they
    have none of their own (default: that optimizer's constructor rate).
    ``group_options``: ``(name, param) -> dict`` of options for the groups they join.
    """

    def __init__(
        self,
        schedules: Sequence[Callback] | Callback | None = (),
        *,
        freeze: Any = None,
        verify: str | bool = "raise",
        optimizer_index: int = 0,
        lr: float | None = None,
        group_options: GroupOptions | None = None,
    ) -> None:
        super().__init__()
        require_int("optimizer_index", optimizer_index)
        self.driver = FreezeDriver(schedules, freeze=freeze, verify=verify)
        self.optimizer_index = optimizer_index
        self.lr = lr
        self.group_options = group_options
        self._ddp_key: tuple[int, ...] | None = None
        self._pending: dict[str, Any] | None = None
        self.ddp_rebuilds = 0

    # -- Lightning hooks ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.driver.bind(pl_module)
        if self._pending is not None:  # load_state_dict ran before setup
            self.driver.restore(self._pending)
            self._pending = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.bind(pl_module)
        optimizers = trainer.optimizers
        if len(optimizers) <= self.optimizer_index:
            raise ValueError(
                f"FreezeCallback(optimizer_index={self.optimizer_index}) but configure_optimizers "
                f"returned {len(optimizers)} optimizer(s)"
            )
        optimizer = optimizers[self.optimizer_index]
        schedulers = [
            c.scheduler
            for c in trainer.lr_scheduler_configs
            if getattr(c.scheduler, "optimizer", None) is optimizer
        ]
        self.driver.attach(
            optimizer,
            lr=self.lr,
            group_options=self.group_options,
            scheduler=schedulers[0] if schedulers else None,
        )
        self.driver.start(trainer.current_epoch)
        self.driver.restored = None
        # DDP was built in strategy.setup over the set that is trainable now
        self._ddp_key = self._key(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.epoch_begin(trainer.current_epoch)
        self._rebuild_ddp(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.epoch_end(trainer.current_epoch, dict(trainer.callback_metrics))
        self._rebuild_ddp(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self.driver.finish()
        finally:
            if self.driver.tracker is not None:
                self.driver.tracker.remove()

    # -- DDP ----------------------------------------------------------------------------
    @staticmethod
    def _key(pl_module: pl.LightningModule) -> tuple[int, ...]:
        return tuple(id(p) for _, p in named_trainable(pl_module))

    def _rebuild_ddp(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-wrap the module in DDP when the trainable set changed (same moment on every rank)."""
        key = self._key(pl_module)
        if key == self._ddp_key:
            return
        self._ddp_key = key
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy) or not isinstance(
            strategy.model, DistributedDataParallel
        ):
            return
        strategy.model = trainer.lightning_module
        strategy.configure_ddp()
        self.ddp_rebuilds += 1

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.driver.model is None:
            return {}
        return {"frostline": self.driver.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("frostline")
        if state is None:
            return
        if self.driver.model is None:
            self._pending = state
        else:
            self.driver.restore(state)

    def __repr__(self) -> str:
        return (
            f"FreezeCallback(schedules={[type(s).__name__ for s in self.driver.schedules]}, "
            f"freeze={self.driver.freeze!r})"
        )
