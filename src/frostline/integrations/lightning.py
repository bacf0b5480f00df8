"""frostline's freezing workflows inside ``lightning.Trainer``.

:class:`FreezeCallback` runs :mod:`frostline.freezing` (freeze at start, unfreeze at
an epoch, gradual unfreezing, discriminative rates, progressive freezing) in a
Lightning fit:

* the trainer's optimizer follows the trainable set: unfrozen parameters join it as
  new groups at their own rate, with the options (weight decay, betas) of your group they
  would have belonged to (no param-group plumbing in your LightningModule, unlike
  ``BaseFinetuning``), frozen ones leave it with their state and ``.grad``; with several
  optimizers, ``optimizer_index={"generator": 0, "discriminator": 1}`` says which
  optimizer each part's parameters join;
* frozen BatchNorm runs in inference mode although Lightning calls ``.train()``;
* under ``strategy="ddp"`` the DDP wrapper is rebuilt, on every rank at once, whenever
  the trainable set changes (DDP only reduces what required grad when it was built);
* weights frozen at the start and never unfrozen are verified bitwise when fit ends;
* the callback's ``state_dict`` carries the trainable state and the optimizer's group
  layout, so ``trainer.fit(..., ckpt_path=...)`` resumes exactly where the run stopped
  (the optimizer state of unfrozen layers included).

Needs the ``lightning`` package (``pip install frostline[lightning]``).

>>> import frostline as fl
>>> cb = FreezeCallback([fl.freezing.UnfreezeAt(2, "backbone")], freeze="backbone")
>>> cb
FreezeCallback(schedules=['UnfreezeAt'], freeze='backbone')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    trainer's optimizers newly unfrozen parameters join: an index (parameters that other
    optimizers hold are left to them), or ``{module path: index}`` (a parameter joins the
    optimizer of the longest path it is under, ``""`` for the rest; parameters under no
    path are left alone). ``lr``: their rate when they have none of their own (default:
    that optimizer's constructor rate; under OneCycleLR/CyclicLR its first group's
    ``max_lr``). ``group_options``: ``(name, param) -> dict`` of options for the groups
    they join (default: the options of the optimizer's group they would have belonged
    to, :func:`~frostline.engine.tracking.like_groups`: no decay for biases and norms
    when your groups say so). ``keep_frozen``: layers you froze by hand before fit stay
    frozen when a schedule unfreezes a layer above them (default False: unfreezing a
    parent unfreezes all below it, as in Keras).
    """

    def __init__(
        self,
        schedules: Sequence[Callback] | Callback | None = (),
        *,
        freeze: Any = None,
        verify: str | bool = "raise",
        optimizer_index: int | Mapping[str, int] = 0,
        lr: float | None = None,
        group_options: GroupOptions | None = None,
        keep_frozen: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(optimizer_index, Mapping):
            if not optimizer_index or not all(
                isinstance(k, str) and not isinstance(v, bool) and isinstance(v, int) and v >= 0
                for k, v in optimizer_index.items()
            ):
                raise ValueError(
                    "optimizer_index as a mapping must map module paths to optimizer indices "
                    f"(ints >= 0), e.g. {{'generator': 0, 'discriminator': 1}}; got {optimizer_index!r}"
                )
            optimizer_index = dict(optimizer_index)
        else:
            require_int("optimizer_index", optimizer_index)
        self.driver = FreezeDriver(schedules, freeze=freeze, verify=verify, keep_frozen=keep_frozen)
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
        for n, (index, scope) in enumerate(self._routes(pl_module, optimizers)):
            optimizer = optimizers[index]
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
                scope=scope,
                also=n > 0,
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
            self.driver.remove()

    def _routes(
        self, pl_module: pl.LightningModule, optimizers: list
    ) -> list[tuple[int, Callable[[str], bool] | None]]:
        """``(optimizer index, parameter-name scope)`` for each optimizer to track."""
        routes = self.optimizer_index
        wanted = [routes] if isinstance(routes, int) else sorted(set(routes.values()))
        if wanted[-1] >= len(optimizers):
            raise ValueError(
                f"FreezeCallback(optimizer_index={routes!r}) but configure_optimizers "
                f"returned {len(optimizers)} optimizer(s)"
            )
        if isinstance(routes, int):
            if len(optimizers) == 1:
                return [(routes, None)]
            names = {id(p): n for n, p in pl_module.named_parameters()}
            others = {
                names[id(p)]
                for i, o in enumerate(optimizers)
                if i != routes
                for g in o.param_groups
                for p in g["params"]
                if id(p) in names
            }
            return [(routes, lambda n: n not in others)]
        modules = dict(pl_module.named_modules())
        unknown = [path for path in routes if path and path not in modules]
        if unknown:
            raise ValueError(
                f"FreezeCallback(optimizer_index=...) names module paths {unknown} that "
                f"{type(pl_module).__name__} does not have"
            )

        def route(name: str) -> int | None:
            best, depth = None, -1
            for path, index in routes.items():
                if (not path or name == path or name.startswith(path + ".")) and len(path) > depth:
                    best, depth = index, len(path)
            return best

        def scope_of(index: int) -> Callable[[str], bool]:
            return lambda name: route(name) == index

        return [(index, scope_of(index)) for index in wanted]

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
