"""What every ``fl.optimizers`` optimizer shares: the rate, Keras's options, and the step.

:class:`Optimizer` is the base of everything ``compile(optimizer=...)`` accepts: a
learning rate (a number or a schedule of the step) and :meth:`Optimizer.build`, which
makes the ``torch.optim.Optimizer`` that ``fit`` steps. :class:`KerasOptimizer` adds
the options of Keras 3's ``BaseOptimizer`` (``weight_decay``, clipping, EMA, gradient
accumulation, ``loss_scale_factor``); each Keras optimizer (``sgd.py``, ``adam.py``,
...) is one subclass holding its signature, its per-weight variables and its update.
:class:`KerasTorchOptimizer` is the torch optimizer they all build: it runs Keras's
``apply`` in Keras's order around the subclass's update.

>>> from frostline.api.optimizers import Adam
>>> w = torch.nn.Parameter(torch.ones(2))
>>> opt = Adam(0.1).build([w])
>>> w.grad = torch.tensor([1.0, -1.0]); opt.step()
>>> [round(x, 4) for x in w.detach().tolist()], opt.iterations
([0.9, 1.1], 1)
"""

from __future__ import annotations

import inspect
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from frostline.api import lr_schedules

__all__ = [
    "KerasOptimizer",
    "KerasTorchOptimizer",
    "Optimizer",
    "Rate",
    "check_number",
    "f32",
]

Rate = float | Callable[[int], float]
Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def check_number(value: object, what: str, *, low: float = 0.0, high: float = math.inf) -> float:
    """``value`` as a float when it is a finite number in ``[low, high]``, else an error saying so.

    >>> check_number(0.9, "beta_1", high=1.0)
    0.9
    >>> check_number(2, "beta_1", high=1.0)
    Traceback (most recent call last):
    ValueError: beta_1 must be a finite number in [0.0, 1.0], got 2
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}: {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{what} must be a finite number {bounds}, got {value!r}")
    return float(value)


def f32(value: float) -> float:
    """``value`` rounded to float32, as Keras casts a Python constant before using it.

    It matters in ``1 - beta_2 ** t``: float32(0.999) makes that term 1.3e-5 smaller
    in relative terms than the exact value, and Keras's bias correction uses it.

    >>> f32(0.1) == 0.1, abs(f32(0.1) - 0.1) < 1e-8
    (False, True)
    """
    return struct.unpack("f", struct.pack("f", value))[0]


def _positive_or_none(value: object, what: str) -> float | None:
    if value is None:
        return None
    out = check_number(value, what)
    if out <= 0:
        raise ValueError(f"{what} must be > 0 or None, got {value!r}")
    return out


def _int_or_none(value: object, what: str, low: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an int >= {low} or None, got {value!r}")
    return value


class Optimizer:
    """Base of every optimizer ``compile`` takes: a learning rate or schedule, and ``build``.

    ``learning_rate`` is the nominal rate (a schedule's initial/peak rate, see
    docs/optimizers.md); ``schedule`` the schedule, or None. Setting
    ``learning_rate`` to a number drops the schedule.

    >>> from frostline.api.optimizers import SGD, Adam, schedules
    >>> spec = SGD(0.1, momentum=0.9)
    >>> spec.learning_rate, spec.slots
    (0.1, 1)
    >>> Adam(schedules.ExponentialDecay(0.01, 100, 0.5)).learning_rate_at(100)
    0.005
    """

    #: tensors of optimizer state per parameter (for memory estimates)
    slots: int = 0

    def __init__(self, learning_rate: Rate) -> None:
        self.schedule: Callable[[int], float] | None = None
        if callable(learning_rate) and not isinstance(learning_rate, bool):
            self.schedule = learning_rate
            self._rate = lr_schedules.nominal_rate(learning_rate)
        else:
            self.learning_rate = learning_rate  # type: ignore[assignment]

    @property
    def learning_rate(self) -> float:
        return self._rate

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"learning_rate must be a number or a schedule (callable of the step), "
                f"got {type(value).__name__}: {value!r}"
            )
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"learning_rate must be a finite number >= 0, got {value!r}")
        self._rate = float(value)
        self.schedule = None

    def learning_rate_at(self, step: int) -> float:
        """The headline rate at optimizer step ``step`` (the schedule's value, or the rate)."""
        return self._rate if self.schedule is None else float(self.schedule(step))

    def rate_config(self) -> Any:
        """The rate as JSON data: the number, or the schedule's configuration."""
        return (
            self.learning_rate
            if self.schedule is None
            else lr_schedules.schedule_config(self.schedule)
        )

    def build(self, groups: Params) -> torch.optim.Optimizer:
        """A torch optimizer over ``groups`` (tensors, or dicts with ``params`` and ``lr``)."""
        raise NotImplementedError

    def group_options(self, name: str, param: torch.Tensor) -> dict[str, Any]:
        """Param-group options for the weight ``param`` named ``name`` (none by default)."""
        return {}

    def get_config(self) -> dict:
        """The configuration as JSON data (what checkpoints record)."""
        raise NotImplementedError


class KerasOptimizer(Optimizer):
    """A Keras 3 optimizer: its options, its per-weight variables and its update.

    A subclass sets its hyperparameters as attributes named as its ``__init__``
    arguments (``get_config`` and ``repr`` read them back) and implements
    :meth:`variables_per_weight` and :meth:`update_step`. The base options are
    Keras's, with its semantics (``keras/src/optimizers/base_optimizer.py``):

    - ``weight_decay``: decoupled, ``w -= w * weight_decay * lr`` before the update,
      on the weights being trained except those :meth:`exclude_from_weight_decay` names;
    - ``clipnorm`` / ``clipvalue`` / ``global_clipnorm`` (at most one);
    - ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``: a moving average of
      every trained weight after each step, copied into the weights every
      ``ema_overwrite_frequency`` steps and by :meth:`KerasTorchOptimizer.finalize_variable_values`
      (which ``fit`` calls at its end);
    - ``gradient_accumulation_steps``: the update runs every N steps on the mean
      gradient of those N; ``iterations`` counts updates, a schedule sees every step;
    - ``loss_scale_factor``: ``fit`` differentiates ``loss * factor`` and the step
      divides the gradients by it.
    """

    #: per-optimizer values beside ``iterations`` kept in every param group (name -> start)
    global_variables: Mapping[str, float] = {}

    def __init__(
        self,
        learning_rate: Rate,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(learning_rate)
        self.weight_decay = (
            None if weight_decay is None else check_number(weight_decay, "weight_decay")
        )
        clips = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
        given = {k: v for k, v in clips.items() if v is not None}
        if len(given) > 1:
            raise ValueError(
                f"only one of clipnorm, clipvalue and global_clipnorm can be set, got {given}"
            )
        self.clipnorm = _positive_or_none(clipnorm, "clipnorm")
        self.clipvalue = _positive_or_none(clipvalue, "clipvalue")
        self.global_clipnorm = _positive_or_none(global_clipnorm, "global_clipnorm")
        if not isinstance(use_ema, bool):
            raise TypeError(f"use_ema must be True or False, got {use_ema!r}")
        self.use_ema = use_ema
        self.ema_momentum = check_number(ema_momentum, "ema_momentum", high=1.0)
        self.ema_overwrite_frequency = _int_or_none(
            ema_overwrite_frequency, "ema_overwrite_frequency", 1
        )
        self.loss_scale_factor = _positive_or_none(loss_scale_factor, "loss_scale_factor")
        self.gradient_accumulation_steps = _int_or_none(
            gradient_accumulation_steps, "gradient_accumulation_steps", 2
        )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self.name = name
        self.exclude_from_weight_decay()
        self.built = False

    # -- Keras's options ----------------------------------------------------------------
    @property
    def slots(self) -> int:  # type: ignore[override]
        """Tensors of state per trained weight (EMA and accumulation included)."""
        extra = int(self.use_ema) + int(bool(self.gradient_accumulation_steps))
        return len(self.variables_per_weight()) + extra

    def exclude_from_weight_decay(
        self,
        var_list: Iterable[torch.Tensor] | None = None,
        var_names: Sequence[str] | None = None,
    ) -> None:
        """Exclude weights from weight decay: these tensors, and those whose name matches.

        As in Keras: each call replaces the previous exclusions; a weight is excluded
        when it is one of ``var_list`` or when one of ``var_names`` occurs in its name
        (a regular-expression search). A weight's name is its ``named_parameters()``
        name (``"head.bias"``, ``"blocks.0.norm1.weight"``), so ``var_names=["bias"]``
        excludes every bias, as in Keras. Call it before the optimizer is built (before
        the first ``fit`` after ``compile``), as Keras requires.

        >>> from frostline.api.optimizers import AdamW
        >>> opt = AdamW(1e-3); opt.exclude_from_weight_decay(var_names=["bias", "norm"])
        >>> opt.decays("head.weight", torch.zeros(1)), opt.decays("head.bias", torch.zeros(1))
        (True, False)
        """
        if getattr(self, "built", False):
            raise ValueError(
                "exclude_from_weight_decay() can only be configured before the optimizer is "
                "built (before the first fit after compile); compile again to change it"
            )
        tensors = list(var_list or [])
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"var_list must hold tensors, got {type(t).__name__}: {t!r}")
        names = list(var_names or [])
        if isinstance(var_names, str) or any(not isinstance(n, str) or not n for n in names):
            raise TypeError(f"var_names must be a list of non-empty str, got {var_names!r}")
        self._excluded_ids = {id(t) for t in tensors}
        self._excluded_pattern = re.compile("|".join(sorted(set(names)))) if names else None

    def decays(self, name: str, param: torch.Tensor) -> bool:
        """Whether weight decay applies to the weight ``param`` named ``name``."""
        if id(param) in self._excluded_ids:
            return False
        return self._excluded_pattern is None or self._excluded_pattern.search(name) is None

    def group_options(self, name: str, param: torch.Tensor) -> dict[str, Any]:
        """Param-group options for the weight ``param`` named ``name``: no decay where excluded.

        The live optimizer groups weights by these (a torch idiom: a group with
        ``weight_decay=0.0``).
        """
        if not self.weight_decay or self.decays(name, param):
            return {}
        return {"weight_decay": 0.0}

    # -- what a subclass provides ---------------------------------------------------------
    def variables_per_weight(self) -> dict[str, float]:
        """The optimizer's variables for each weight: name -> initial value."""
        return {}

    def update_step(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        slots: dict[str, list[torch.Tensor]],
        lr: float,
        step: int,
        group: dict[str, Any],
    ) -> None:
        """Update ``params`` in place from ``grads`` (Keras's ``update_step``, vectorised).

        ``slots``: each variable of :meth:`variables_per_weight`, one tensor per param;
        ``lr``: the group's rate now; ``step``: this update's number, from 1;
        ``group``: the param group (per-optimizer values such as Nadam's ``u_product``).
        """
        raise NotImplementedError

    def advance(self, group: dict[str, Any], step: int) -> None:
        """After update number ``step``, move the per-optimizer values of ``group`` on."""

    # -- building ------------------------------------------------------------------------
    def build(self, groups: Params) -> KerasTorchOptimizer:
        """The torch optimizer running this optimizer's math over ``groups``.

        >>> from frostline.api.optimizers import SGD
        >>> opt = SGD(0.1, momentum=0.9, nesterov=True).build([torch.zeros(1)])
        >>> type(opt).__name__, opt.spec.nesterov
        ('KerasTorchOptimizer', True)
        """
        self.built = True  # as in Keras, the exclusions are fixed from now on
        return KerasTorchOptimizer(groups, self)

    # -- configuration -------------------------------------------------------------------
    def _arguments(self) -> list[inspect.Parameter]:
        params = list(inspect.signature(type(self).__init__).parameters.values())
        return [p for p in params if p.name not in ("self", "learning_rate")]

    def get_config(self) -> dict:
        """Keras's configuration: the class, the rate (or schedule) and every argument.

        >>> from frostline.api.optimizers import Lion
        >>> Lion(3e-4).get_config()["beta_2"]
        0.99
        """
        out: dict[str, Any] = {"class": type(self).__name__, "learning_rate": self.rate_config()}
        for p in self._arguments():
            out[p.name] = getattr(self, p.name)
        return out

    def __repr__(self) -> str:
        changed = "".join(
            f", {p.name}={getattr(self, p.name)!r}"
            for p in self._arguments()
            if getattr(self, p.name) != p.default
        )
        rate = self.learning_rate if self.schedule is None else self.schedule
        return f"{type(self).__name__}({rate}{changed})"


class KerasTorchOptimizer(torch.optim.Optimizer):
    """The ``torch.optim.Optimizer`` a :class:`KerasOptimizer` builds: Keras's ``apply``.

    One :meth:`step` does, in Keras 3's order: divide the gradients by
    ``loss_scale_factor``; with gradient accumulation, add them to the accumulators
    and stop there unless this is the N-th step (then use the mean of the N); clip;
    decay the weights (``w -= w * wd * lr``); the subclass's update; update the moving
    averages (EMA) and, every ``ema_overwrite_frequency`` updates, copy them into the
    weights; count the step.

    The step counter is one per optimizer, as in Keras, kept in every param group
    (``"iterations"``: the number of :meth:`step` calls, Keras's ``_iterations``) so
    ``state_dict()`` carries it; a group added later (a layer unfrozen mid-fit) takes the
    current count and starts with fresh variables, as a variable a pre-built Keras
    optimizer had not updated yet. The per-weight variables (moments, the EMA
    ``average``, the ``gradient_accumulator``) live in ``state``, so checkpoints carry
    them too. Updates are vectorised with ``torch._foreach_*`` (one kernel per
    operation and group).

    Rates: with a schedule, a group's rate at step ``t`` is
    ``schedule(t) * group["lr"] / defaults["lr"]`` (``defaults["lr"]`` is the nominal
    rate), so a group set to a fraction of the nominal rate follows the schedule
    scaled by that fraction.
    """

    def __init__(self, params: Params, spec: KerasOptimizer) -> None:
        self.spec = spec
        self.schedule = spec.schedule
        defaults = {
            "lr": spec.learning_rate,
            "weight_decay": spec.weight_decay or 0.0,
            "iterations": 0,
            **spec.global_variables,
        }
        items: list[Any] = list(params)
        if items and all(isinstance(p, torch.Tensor) for p in items):
            items = [{"params": items}]
        super().__init__(items, defaults)

    # -- counters ------------------------------------------------------------------------
    @property
    def schedule_step(self) -> int:
        """Steps taken (Keras's ``_iterations``): what a learning-rate schedule is evaluated at."""
        return int(self.param_groups[0]["iterations"]) if self.param_groups else 0

    @property
    def iterations(self) -> int:
        """Keras's ``optimizer.iterations``: steps taken, divided by ``gradient_accumulation_steps``."""
        n = self.spec.gradient_accumulation_steps
        return self.schedule_step // n if n else self.schedule_step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's; a new group takes the optimizer's current counters."""
        if self.param_groups:
            for key in ("iterations", *self.spec.global_variables):
                param_group.setdefault(key, self.param_groups[0][key])
        super().add_param_group(param_group)

    # -- rates ---------------------------------------------------------------------------
    def rate(self, group: dict[str, Any], step: int | None = None) -> float:
        """The learning rate ``group`` uses at ``step`` (default: the next step).

        >>> from frostline.api.optimizers import SGD
        >>> from frostline.api.lr_schedules import ExponentialDecay
        >>> opt = SGD(ExponentialDecay(0.1, 1, 0.5)).build([torch.zeros(1)])
        >>> opt.rate(opt.param_groups[0], step=2)
        0.025
        """
        if self.schedule is None:
            return float(group["lr"])
        t = self.schedule_step if step is None else step
        scheduled = float(self.schedule(t))
        if group["lr"] == self.defaults["lr"]:
            return scheduled
        return scheduled * float(group["lr"]) / float(self.defaults["lr"])

    # -- the fit-time hooks --------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale_factor`` (Keras's ``scale_loss``); ``loss`` when there is none."""
        factor = self.spec.loss_scale_factor
        return loss if factor is None else loss * factor

    @torch.no_grad()
    def finalize_variable_values(self, var_list: Iterable[torch.Tensor] | None = None) -> None:
        """With ``use_ema``, overwrite the weights (``var_list``, default all) by their averages.

        ``fit`` calls it after its last epoch, as Keras's does.
        """
        if not self.spec.use_ema:
            return
        params = self._all_params() if var_list is None else list(var_list)
        pairs = [(p, self.state[p]["average"]) for p in params if "average" in self.state[p]]
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [a for _, a in pairs])

    # -- the step ------------------------------------------------------------------------
    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:
            for name, fill in self.spec.variables_per_weight().items():
                st[name] = torch.full_like(p, fill, memory_format=torch.preserve_format)
            if self.spec.use_ema:
                # Keras's average follows a weight from the optimizer's build on; one that
                # joins later has an average equal to itself (it did not change until now)
                st["average"] = p.detach().clone(memory_format=torch.preserve_format)
            if self.spec.gradient_accumulation_steps:
                st["gradient_accumulator"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
        return st

    def _clip(self, grads: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        spec = self.spec
        if spec.clipnorm is not None:
            out = []
            for gs in grads:
                if not gs:
                    out.append(gs)
                    continue
                norms = torch._foreach_norm(gs)
                clipped = torch._foreach_mul(gs, spec.clipnorm)
                torch._foreach_div_(clipped, torch._foreach_clamp_min(norms, spec.clipnorm))
                out.append(list(clipped))
            return out
        if spec.global_clipnorm is not None:
            flat = [g for gs in grads for g in gs]
            if not flat:
                return grads
            norms = torch._foreach_norm(flat)
            total = torch.linalg.vector_norm(torch.stack([n.to(flat[0].device) for n in norms]))
            c = spec.global_clipnorm
            # Keras: clip * min(1/norm, 1/clip), made NaN when the norm is not finite
            scale = c * torch.minimum(1.0 / total, total.new_tensor(1.0 / c)) + (total - total)
            return [list(torch._foreach_mul(gs, scale)) if gs else gs for gs in grads]
        if spec.clipvalue is not None:
            v = spec.clipvalue
            out = []
            for gs in grads:
                if gs:
                    gs = list(torch._foreach_clamp_min(gs, -v))
                    torch._foreach_clamp_max_(gs, v)
                out.append(gs)
            return out
        return grads

    def _accumulate(
        self,
        params: list[list[torch.Tensor]],
        grads: list[list[torch.Tensor]],
        n: int,
        apply: bool,
    ) -> list[list[torch.Tensor]]:
        """Keras's accumulation over ``n`` steps: add to the accumulators, or (``apply``) the mean."""
        out = []
        for ps, gs in zip(params, grads):
            accs = [self._state(p)["gradient_accumulator"] for p in ps]
            if not apply:
                if accs:
                    torch._foreach_add_(accs, gs)
                out.append(gs)
            elif accs:
                mean = torch._foreach_add(gs, accs)
                torch._foreach_div_(mean, float(n))
                out.append(list(mean))
            else:
                out.append(gs)
        if apply:  # Keras resets every accumulator after an update
            every = [
                st["gradient_accumulator"]
                for st in self.state.values()
                if "gradient_accumulator" in st
            ]
            if every:
                torch._foreach_zero_(every)
        return out

    def _moving_average(self, count: int) -> None:
        """Keras's EMA of every weight; ``count``: updates before this step (``iterations``)."""
        spec = self.spec
        params = self._all_params()
        if not params:
            return
        averages = [self._state(p)["average"] for p in params]
        momentum = 0.0 if count == 0 else f32(spec.ema_momentum)  # Keras casts it
        torch._foreach_mul_(averages, momentum)
        torch._foreach_add_(averages, params, alpha=1.0 - momentum)
        every = spec.ema_overwrite_frequency
        if every and (count + 1) % every == 0:
            torch._foreach_copy_(params, averages)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Keras ``apply`` over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        spec = self.spec
        t = self.schedule_step
        params: list[list[torch.Tensor]] = []
        grads: list[list[torch.Tensor]] = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(spec).__name__} does not support sparse gradients "
                        f"(parameter of shape {tuple(p.shape)}); use a dense embedding"
                    )
            params.append(ps)
            grads.append([p.grad for p in ps])
        if spec.loss_scale_factor is not None:
            grads = [
                list(torch._foreach_div(gs, spec.loss_scale_factor)) if gs else gs for gs in grads
            ]
        n = spec.gradient_accumulation_steps
        apply = not n or (t + 1) % n == 0
        if n:
            grads = self._accumulate(params, grads, n, apply)
        count = t // n if n else t  # updates before this step (Keras's iterations)
        if apply:
            grads = self._clip(grads)
            for group, ps, gs in zip(self.param_groups, params, grads):
                if not ps:
                    continue
                states = [self._state(p) for p in ps]  # before any change (EMA starts there)
                lr = self.rate(group, t)  # a schedule sees every step, as in Keras
                wd = group["weight_decay"]
                if wd:
                    torch._foreach_mul_(ps, 1.0 - f32(wd) * lr)  # Keras casts wd first
                slots = {name: [st[name] for st in states] for name in spec.variables_per_weight()}
                spec.update_step(ps, gs, slots, lr, count + 1, group)
            for group in self.param_groups:
                spec.advance(group, count + 1)
        if spec.use_ema:
            self._moving_average(count)
        for group in self.param_groups:
            group["iterations"] = t + 1
        return loss

    def __repr__(self) -> str:
        return f"KerasTorchOptimizer({self.spec!r}, {len(self._all_params())} weights)"
