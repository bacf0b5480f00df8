"""What the Lightning and Hugging Face callbacks share, independent of either library.

A :class:`FreezeDriver` runs frostline's freezing schedules (the callbacks of
:mod:`frostline.freezing`, unchanged) against a model some other library trains:

* :meth:`~FreezeDriver.bind` wraps the module as a frostline Model (frozen BatchNorm
  then runs in inference mode across ``.train()``) and freezes what should start frozen;
* :meth:`~FreezeDriver.attach` tracks the library's optimizer (or each of several,
  :class:`~frostline.engine.tracking.OptimizerTracker`): frozen parameters leave it,
  unfrozen ones join as new groups at their own rate, with the options of the group they
  would have belonged to;
* :meth:`~FreezeDriver.start`, :meth:`~FreezeDriver.epoch_begin`,
  :meth:`~FreezeDriver.epoch_end` call the schedules' hooks and sync the optimizer;
* :meth:`~FreezeDriver.finish` verifies that every weight frozen at the start and
  never unfrozen is bitwise unchanged;
* :meth:`~FreezeDriver.state` / :meth:`~FreezeDriver.restore`: JSON-able state for
  resuming with the trainable set (and the optimizer's group layout) a run stopped with.

>>> import torch, frostline as fl
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> driver = FreezeDriver([fl.freezing.UnfreezeAt(1, "0")], freeze="0")
>>> model = driver.bind(net)
>>> opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
>>> _ = driver.attach(opt); driver.start(0)
>>> driver.epoch_begin(0), driver.epoch_begin(1), len(opt.param_groups)
(False, True, 2)
>>> driver.finish().ok
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from frostline.api import select
from frostline.api.callbacks import Callback
from frostline.api.model import Model
from frostline.api.saving import apply_trainable_state
from frostline.core import batchnorm
from frostline.core.freezing import trainable_state
from frostline.engine.tracking import GroupOptions, OptimizerTracker, named_trainable
from frostline.engine.verify import Fingerprint, FrozenWeightsChanged, Report, fingerprint

__all__ = ["BoundModel", "FreezeDriver", "FrozenWeightsChanged"]

STATE_FORMAT = "frostline.integration"


class BoundModel(Model):
    """A module trained by another library, as frostline's schedules see it.

    Its ``learning_rate`` is the tracked optimizer's default rate for parameters that
    join it (what ``DiscriminativeLR`` scales from when given no ``base_lr``).
    """

    def __init__(self, module: nn.Module, driver: FreezeDriver, name: str | None = None) -> None:
        super().__init__(module, name=name)
        self.driver = driver

    @property
    def learning_rate(self) -> float:
        tracker = self.driver.tracker
        if tracker is None:
            raise RuntimeError(
                "the training library has not built its optimizer yet, so there is no learning rate to read"
            )
        return tracker.lr

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        tracker = self.driver.tracker
        if tracker is None:
            raise RuntimeError("the training library has not built its optimizer yet")
        tracker.lr = float(value)


def _check_schedules(schedules: object) -> list[Callback]:
    if isinstance(schedules, Callback):
        return [schedules]
    if schedules is None:
        return []
    if not isinstance(schedules, Sequence) or isinstance(schedules, str):
        raise TypeError(
            f"schedules must be a list of frostline callbacks (fl.freezing.*), got {type(schedules).__name__}"
        )
    out = list(schedules)
    for s in out:
        if not isinstance(s, Callback):
            raise TypeError(
                "schedules must be frostline callbacks (fl.freezing.UnfreezeAt, GradualUnfreezing, "
                f"DiscriminativeLR, ProgressiveFreezing, or an fl.callbacks.Callback), got {type(s).__name__}: {s!r}"
            )
    return out


class FreezeDriver:
    """Freezing schedules, optimizer tracking and verification for a foreign training loop.

    ``schedules``: frostline callbacks (:mod:`frostline.freezing`) whose
    ``on_train_begin``/``on_epoch_begin``/``on_epoch_end`` run at the library's
    matching moments (0-based epochs). ``freeze``: a selector (glob string, list,
    ``fl.select.*``) of layers to freeze when the model is bound (``None``: leave the
    model as it is). ``verify``: check frozen weights when training ends
    (``"raise"``, ``"warn"`` or ``False``). ``keep_frozen``: layers already frozen when
    the model is bound (frozen by hand, before ``freeze=``) stay frozen whatever the
    schedules unfreeze; by default (False) unfreezing a parent unfreezes every layer
    below it, as Keras' ``trainable = True`` does.
    """

    def __init__(
        self,
        schedules: Sequence[Callback] | Callback | None = (),
        *,
        freeze: Any = None,
        verify: str | bool = "raise",
        keep_frozen: bool = False,
    ) -> None:
        self.schedules = _check_schedules(schedules)
        if verify is True:
            verify = "raise"
        if verify not in ("raise", "warn", False):
            raise ValueError(f"verify must be 'raise', 'warn' or False, got {verify!r}")
        if not isinstance(keep_frozen, bool):
            raise TypeError(f"keep_frozen must be True or False, got {keep_frozen!r}")
        self.freeze = freeze
        self.verify = verify
        self.keep_frozen = keep_frozen
        self.hand_frozen: list[str] = []
        self.model: BoundModel | None = None
        self.trackers: list[OptimizerTracker] = []
        self.report: Report | None = None
        self.restored: dict[str, Any] | None = None
        self._fingerprint: Fingerprint | None = None
        self._exempt: set[int] = set()
        self._started = False

    # -- binding ------------------------------------------------------------------------
    def bind(self, module: nn.Module) -> BoundModel:
        """Wrap ``module`` for the schedules and freeze what starts frozen (idempotent per module)."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        if self.model is not None and self.model.module is module:
            return self.model
        model = BoundModel(module, self, name=type(module).__name__)
        self.hand_frozen = (
            [
                e.path
                for e in select.leaves_of(module)
                if e.params() and not any(p.requires_grad for p in e.params())
            ]
            if self.keep_frozen
            else []
        )
        if self.freeze is not None:
            model.freeze(self.freeze)
        for s in self.schedules:
            s.set_model(model)  # GradualUnfreezing freezes its base here
        self.model = model
        self.trackers = []
        self._started = False
        return model

    @property
    def tracker(self) -> OptimizerTracker | None:
        """The (first) tracked optimizer's tracker; None before :meth:`attach`."""
        return self.trackers[0] if self.trackers else None

    def _require_model(self) -> BoundModel:
        if self.model is None:
            raise RuntimeError("FreezeDriver: bind(module) first")
        return self.model

    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lr: float | None = None,
        group_options: GroupOptions | None = None,
        scheduler: Any = None,
        scope: Callable[[str], bool] | None = None,
        also: bool = False,
    ) -> OptimizerTracker:
        """Track ``optimizer`` (synced before each of its steps) and its LR ``scheduler``; a restored layout is applied.

        ``scope``: the parameter names this optimizer manages (default: all).
        ``also=True`` tracks it besides the optimizers already tracked (a loop with
        several, each with its ``scope``); otherwise it replaces them.
        """
        model = self._require_model()
        if not also:
            if len(self.trackers) == 1 and self.trackers[0].optimizer is optimizer:
                return self.trackers[0]
            for old in self.trackers:
                old.remove()
            self.trackers = []
        tracker = OptimizerTracker(
            optimizer,
            model.module,
            lr=lr,
            group_options=group_options,
            scheduler=scheduler,
            scope=scope,
        )
        index = len(self.trackers)
        self.trackers.append(tracker)
        restored = self.restored or {}
        layouts = restored.get("layouts") or [restored.get("layout")]
        layout = layouts[index] if index < len(layouts) else None
        if layout is not None:
            tracker.restore_layout(layout)
        else:
            tracker.sync()
        tracker.attach()
        return tracker

    # -- the training run ---------------------------------------------------------------
    def _note(self) -> None:
        model = self._require_model()
        self._exempt.update(id(p) for _, p in named_trainable(model.module))
        for m in model.module.modules():
            if batchnorm.is_batchnorm(m) and not batchnorm.runs_inference(m):
                self._exempt.update(id(b) for b in m.buffers(recurse=False))

    def _keep_hand_frozen(self) -> None:
        """Freeze again what was frozen by hand when ``keep_frozen`` (after the schedules ran)."""
        if not self.hand_frozen:
            return
        model = self._require_model()
        entries = {e.path: e for e in select.leaves_of(model.module)}
        if any(
            p.requires_grad
            for path in self.hand_frozen
            if path in entries
            for p in entries[path].params()
        ):
            model.freeze(self.hand_frozen)

    def sync(self) -> bool:
        """Bring the tracked optimizers in line with the trainable set; True if one changed."""
        self._keep_hand_frozen()
        changed = False
        for tracker in self.trackers:
            if tracker.sync():
                tracker.refresh_rates()
                changed = True
        self._note()
        return changed

    def remove(self) -> None:
        """Take the trackers' hooks off (training ended)."""
        for tracker in self.trackers:
            tracker.remove()

    def start(self, epoch: int = 0) -> None:
        """Training begins: schedules' ``on_train_begin``, then fingerprint the frozen weights."""
        model = self._require_model()
        for s in self.schedules:
            s.on_train_begin({})
        if self.restored is not None:
            # the saved state is the authority on a resumed run (schedules are idempotent)
            apply_trainable_state(model.module, self.restored["trainable"])
        self.sync()
        self._exempt = set()
        self._note()
        self._fingerprint = fingerprint(model.module) if self.verify else None
        self.report = None
        self._started = True

    def epoch_begin(self, epoch: int) -> bool:
        """The schedules' ``on_epoch_begin(epoch)``; True when the trainable set (or a rate) changed."""
        self._require_model()
        for s in self.schedules:
            s.on_epoch_begin(epoch, {})
        return self.sync()

    def epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """The schedules' ``on_epoch_end(epoch, logs)`` (numbers only)."""
        clean = {
            k: float(v)
            for k, v in (logs or {}).items()
            if isinstance(v, int | float | torch.Tensor)
            and not isinstance(v, bool)
            and (not isinstance(v, torch.Tensor) or v.numel() == 1)
        }
        for s in self.schedules:
            s.on_epoch_end(epoch, clean)
        self.sync()

    def finish(self) -> Report | None:
        """Training ended: verify the frozen weights (raise or warn as ``verify`` says)."""
        model = self._require_model()
        for s in self.schedules:
            s.on_train_end({})
        if self._fingerprint is None:
            return None
        report = self._fingerprint.check(model.module, exempt=self._exempt)
        self.report = report
        if not report.ok:
            if self.verify == "raise":
                raise FrozenWeightsChanged(str(report))
            import warnings

            warnings.warn(str(report), RuntimeWarning, stacklevel=2)
        return report

    # -- resume -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able: trainable state, schedule states, the optimizer's group layout."""
        model = self._require_model()
        return {
            "format": STATE_FORMAT,
            "version": 1,
            "trainable": trainable_state(model.module),
            "schedules": [
                {"class": type(s).__name__, "state": s.get_state()} for s in self.schedules
            ],
            "layout": self.tracker.layout() if self.tracker is not None else None,
            "layouts": [t.layout() for t in self.trackers],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take a :meth:`state` back: the trainable set now, schedules' states, the layout for :meth:`attach`."""
        model = self._require_model()
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a frostline integration state (expected format {STATE_FORMAT!r}), got {str(state)[:200]}"
            )
        saved = state.get("schedules", [])
        if len(saved) != len(self.schedules) or any(
            entry.get("class") != type(s).__name__ for entry, s in zip(saved, self.schedules)
        ):
            raise ValueError(
                "the checkpoint was written with schedules "
                f"{[e.get('class') for e in saved]}, this run has {[type(s).__name__ for s in self.schedules]}; "
                "resume with the same schedules in the same order"
            )
        apply_trainable_state(model.module, state["trainable"])
        for entry, s in zip(saved, self.schedules):
            s.set_state(entry.get("state") or {})
        self.restored = state
        layouts = state.get("layouts") or [state.get("layout")]
        for tracker, layout in zip(self.trackers, layouts):
            if layout is not None:
                tracker.restore_layout(layout)


def epoch_of(value: float) -> int:
    """The 0-based epoch a (possibly fractional) epoch counter is in: ``2.0 -> 2``, ``1.5 -> 1``.

    >>> epoch_of(1.9999999), epoch_of(1.5), epoch_of(0)
    (2, 1, 0)
    """
    return int(math.floor(float(value) + 1e-6))


class DriverViews:
    """What the integration callbacks show users of their :class:`FreezeDriver` (``self.driver``)."""

    driver: FreezeDriver

    @property
    def tracker(self) -> OptimizerTracker | None:
        """The tracker of the trainer's optimizer (None before training starts)."""
        return self.driver.tracker

    @property
    def report(self) -> Report | None:
        """The frozen-weight verification of the last training run."""
        return self.driver.report

    @property
    def schedules(self) -> list[Callback]:
        """The freezing schedules this callback runs."""
        return self.driver.schedules
