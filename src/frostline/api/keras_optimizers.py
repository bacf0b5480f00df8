"""Keras 3 update rules as ``torch.optim.Optimizer`` subclasses.

Each step does what Keras 3's ``BaseOptimizer.apply`` does, in its order:

1. clip the gradients (``clipnorm`` per tensor, ``global_clipnorm`` over every
   gradient, or ``clipvalue``; at most one);
2. decoupled weight decay on the parameters being updated, ``w -= w * wd * lr``;
3. the optimizer's own update (formulas of ``keras/src/optimizers/*.py``);
4. ``iterations += 1``.

``iterations`` is one counter per optimizer, as in Keras: Adam's bias correction and
a learning-rate schedule use it, and a parameter that joins later (a layer unfrozen
mid-fit) starts with fresh slots at the current count, exactly like a variable that
a pre-built Keras optimizer had not updated before. The counter (and Nadam's running
``u_product``) lives in every param group, so ``state_dict()``/``load_state_dict()``
and frostline's pickle-free checkpoints carry it without extra code.

Learning rate: ``lr`` is a float, a :mod:`~frostline.api.lr_schedules` schedule or any
callable ``step -> rate``. With a schedule, a group's rate at step ``t`` is
``schedule(t) * group["lr"] / defaults["lr"]``, where ``defaults["lr"]`` is the
schedule's nominal rate: a group at the nominal rate follows the schedule exactly,
and a group set to a fraction of it (discriminative rates, ``ReduceLROnPlateau``)
follows the same schedule scaled by that fraction.

Updates are vectorised with ``torch._foreach_*`` (one kernel per operation and group).

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(2))
>>> opt = Adam([w], lr=0.1)
>>> w.grad = torch.tensor([1.0, -1.0]); opt.step()
>>> [round(x, 4) for x in w.detach().tolist()], opt.iterations
([0.9, 1.1], 1)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable
from typing import Any

import torch

from frostline.api.lr_schedules import nominal_rate

__all__ = [
    "KerasOptimizer",
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "Adamax",
    "Nadam",
    "Adagrad",
    "Lion",
]

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
Rate = float | Callable[[int], float]


def _number(value: object, what: str, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}: {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{what} must be a finite number {bounds}, got {value!r}")
    return float(value)


def _f32(value: float) -> float:
    """``value`` rounded to float32, as Keras casts a Python constant before ``power``.

    It matters in ``1 - beta_2 ** t``: float32(0.999) makes that term 1.3e-5 smaller
    in relative terms than the exact value, and Keras's bias correction uses it.
    """
    return struct.unpack("f", struct.pack("f", value))[0]


def _optional(value: object, what: str) -> float | None:
    if value is None:
        return None
    out = _number(value, what)
    if out <= 0:
        raise ValueError(f"{what} must be > 0 or None, got {value!r}")
    return out


class KerasOptimizer(torch.optim.Optimizer):
    """Shared machinery: learning rate or schedule, clipping, weight decay, ``iterations``.

    Subclasses say which per-parameter slots a group needs (:meth:`_slots`) and
    implement :meth:`_update` on lists of parameters, gradients and slot tensors.
    """

    #: per-optimizer values kept in every param group (copied into groups added later)
    _global_keys: tuple[str, ...] = ("iterations",)

    def __init__(
        self,
        params: Params,
        lr: Rate,
        defaults: dict[str, Any],
        *,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        if callable(lr):
            self.schedule: Callable[[int], float] | None = lr
            nominal = nominal_rate(lr)
        else:
            self.schedule = None
            nominal = _number(lr, "learning_rate")
        clips = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
        given = {k: v for k, v in clips.items() if v is not None}
        if len(given) > 1:
            raise ValueError(
                f"only one of clipnorm, clipvalue and global_clipnorm can be set, got {given}"
            )
        self.clipnorm = _optional(clipnorm, "clipnorm")
        self.clipvalue = _optional(clipvalue, "clipvalue")
        self.global_clipnorm = _optional(global_clipnorm, "global_clipnorm")
        wd = 0.0 if weight_decay is None else _number(weight_decay, "weight_decay")
        base = {"lr": nominal, "weight_decay": wd, **defaults, "iterations": 0}
        super().__init__(params, base)

    @property
    def global_keys(self) -> tuple[str, ...]:
        """Group keys that are per-optimizer counters, not hyperparameters (``iterations``, ...)."""
        return self._global_keys

    # -- counters --------------------------------------------------------------------
    @property
    def iterations(self) -> int:
        """Updates applied so far (Keras ``optimizer.iterations``)."""
        return int(self.param_groups[0]["iterations"]) if self.param_groups else 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, and a new group takes the optimizer's current ``iterations``."""
        if self.param_groups:
            for key in self._global_keys:
                param_group.setdefault(key, self.param_groups[0][key])
        super().add_param_group(param_group)

    # -- rates -----------------------------------------------------------------------
    def rate(self, group: dict[str, Any], step: int | None = None) -> float:
        """The learning rate ``group`` uses at ``step`` (default: the next update).

        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> from frostline.api.lr_schedules import ExponentialDecay
        >>> opt = SGD([w], lr=ExponentialDecay(0.1, 1, 0.5))
        >>> opt.rate(opt.param_groups[0], step=2)
        0.025
        """
        if self.schedule is None:
            return float(group["lr"])
        t = self.iterations if step is None else step
        scheduled = float(self.schedule(t))
        if group["lr"] == self.defaults["lr"]:
            return scheduled
        return scheduled * float(group["lr"]) / float(self.defaults["lr"])

    # -- the step --------------------------------------------------------------------
    def _clip(self, grads: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        if self.clipnorm is not None:
            out = []
            for gs in grads:
                if not gs:
                    out.append(gs)
                    continue
                norms = torch._foreach_norm(gs)
                clipped = torch._foreach_mul(gs, self.clipnorm)
                torch._foreach_div_(clipped, torch._foreach_clamp_min(norms, self.clipnorm))
                out.append(list(clipped))
            return out
        if self.global_clipnorm is not None:
            flat = [g for gs in grads for g in gs]
            if not flat:
                return grads
            norms = torch._foreach_norm(flat)
            total = torch.linalg.vector_norm(torch.stack([n.to(flat[0].device) for n in norms]))
            c = self.global_clipnorm
            # Keras: clip * min(1/norm, 1/clip), made NaN when the norm is not finite
            scale = c * torch.minimum(1.0 / total, total.new_tensor(1.0 / c)) + (total - total)
            return [list(torch._foreach_mul(gs, scale)) if gs else gs for gs in grads]
        if self.clipvalue is not None:
            v = self.clipvalue
            out = []
            for gs in grads:
                if gs:
                    gs = list(torch._foreach_clamp_min(gs, -v))
                    torch._foreach_clamp_max_(gs, v)
                out.append(gs)
            return out
        return grads

    def _slots(self, group: dict[str, Any]) -> dict[str, float]:
        """Per-parameter state this group needs: name -> initial value."""
        return {}

    def _state(self, p: torch.Tensor, slots: dict[str, float]) -> dict[str, torch.Tensor]:
        st = self.state[p]
        if not st:
            for name, fill in slots.items():
                st[name] = torch.full_like(p, fill, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Keras update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.iterations
        params: list[list[torch.Tensor]] = []
        grads: list[list[torch.Tensor]] = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter of shape {tuple(p.shape)}); use a dense embedding"
                    )
            params.append(ps)
            grads.append([p.grad for p in ps])
        grads = self._clip(grads)
        for group, ps, gs in zip(self.param_groups, params, grads):
            if not ps:
                continue
            lr = self.rate(group, t)
            wd = group["weight_decay"]
            if wd:
                torch._foreach_mul_(ps, 1.0 - _f32(wd) * lr)  # Keras casts wd first
            names = self._slots(group)
            states = [self._state(p, names) for p in ps]
            slots = {name: [st[name] for st in states] for name in names}
            self._update(group, ps, gs, slots, lr, t + 1)
        for group in self.param_groups:
            self._advance(group, t + 1)
        return loss

    def _advance(self, group: dict[str, Any], step: int) -> None:
        group["iterations"] = step

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        slots: dict[str, list[torch.Tensor]],
        lr: float,
        step: int,
    ) -> None:
        raise NotImplementedError


class SGD(KerasOptimizer):
    """Keras SGD: ``m = momentum * m - lr * g``; ``w += m`` (Nesterov: ``w += momentum * m - lr * g``).

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = SGD([w], lr=0.1, momentum=0.9)
    >>> for _ in range(2):
    ...     w.grad = torch.ones(1); opt.step()
    >>> round(w.item(), 6)
    -0.29
    """

    def __init__(
        self,
        params: Params,
        lr: Rate = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        momentum = _number(momentum, "momentum", high=1.0)
        super().__init__(
            params,
            lr,
            {"momentum": momentum, "nesterov": bool(nesterov)},
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )

    def _slots(self, group):
        return {"momentum": 0.0} if group["momentum"] else {}

    def _update(self, group, params, grads, slots, lr, step):
        momentum = _f32(group["momentum"])  # Keras casts it to the variable dtype
        if not momentum:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        m = slots["momentum"]
        torch._foreach_mul_(m, momentum)
        torch._foreach_add_(m, grads, alpha=-lr)
        if group["nesterov"]:
            upd = torch._foreach_mul(m, momentum)
            torch._foreach_add_(upd, grads, alpha=-lr)
            torch._foreach_add_(params, upd)
        else:
            torch._foreach_add_(params, m)


def _betas(beta_1: float, beta_2: float) -> tuple[float, float]:
    return _number(beta_1, "beta_1", high=1.0), _number(beta_2, "beta_2", high=1.0)


class Adam(KerasOptimizer):
    """Keras Adam: ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)``.

    ``epsilon`` is added to ``sqrt(v)`` before the bias-correction factor is applied
    (torch adds it after), default 1e-7 (torch: 1e-8).

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = Adam([w], lr=0.1, amsgrad=True)
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 4)
    -0.1
    """

    def __init__(
        self,
        params: Params,
        lr: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        b1, b2 = _betas(beta_1, beta_2)
        super().__init__(
            params,
            lr,
            {
                "beta_1": b1,
                "beta_2": b2,
                "epsilon": _number(epsilon, "epsilon"),
                "amsgrad": bool(amsgrad),
            },
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )

    def _slots(self, group):
        extra = {"velocity_hat": 0.0} if group["amsgrad"] else {}
        return {"momentum": 0.0, "velocity": 0.0, **extra}

    def _update(self, group, params, grads, slots, lr, step):
        b1, b2 = group["beta_1"], group["beta_2"]
        alpha = lr * math.sqrt(1 - _f32(b2) ** step) / (1 - _f32(b1) ** step)
        m, v = slots["momentum"], slots["velocity"]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        if group["amsgrad"]:
            v_hat = slots["velocity_hat"]
            torch._foreach_maximum_(v_hat, v)
            v = v_hat
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, group["epsilon"])
        torch._foreach_addcdiv_(params, m, denom, value=-alpha)


class AdamW(Adam):
    """Keras AdamW: Adam with decoupled weight decay, default ``weight_decay=0.004``.

    >>> w = torch.nn.Parameter(torch.ones(1)); opt = AdamW([w], lr=0.1, weight_decay=0.5)
    >>> w.grad = torch.zeros(1); opt.step(); round(w.item(), 6)
    0.95
    """

    def __init__(
        self,
        params: Params,
        lr: Rate = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        if weight_decay is None:
            raise ValueError("AdamW needs a weight_decay number, got None")
        super().__init__(
            params,
            lr,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )


class RMSprop(KerasOptimizer):
    """Keras RMSprop: ``v = rho * v + (1 - rho) * g^2``; ``w -= lr * g / sqrt(v + epsilon)``.

    ``centered`` subtracts the squared mean gradient inside the root; ``momentum``
    accumulates the increments. Epsilon sits inside the square root (torch: outside).

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = RMSprop([w], lr=0.01)
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 5)
    -0.03162
    """

    def __init__(
        self,
        params: Params,
        lr: Rate = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        momentum = _number(momentum, "momentum", high=1.0)
        super().__init__(
            params,
            lr,
            {
                "rho": _number(rho, "rho", high=1.0),
                "momentum": momentum,
                "epsilon": _number(epsilon, "epsilon"),
                "centered": bool(centered),
            },
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )

    def _slots(self, group):
        out = {"velocity": 0.0}
        if group["momentum"] > 0:
            out["momentum"] = 0.0
        if group["centered"]:
            out["average_gradient"] = 0.0
        return out

    def _update(self, group, params, grads, slots, lr, step):
        rho = group["rho"]
        v = slots["velocity"]
        torch._foreach_mul_(v, rho)
        torch._foreach_addcmul_(v, grads, grads, value=1 - rho)
        if group["centered"]:
            a = slots["average_gradient"]
            torch._foreach_mul_(a, rho)
            torch._foreach_add_(a, grads, alpha=1 - rho)
            denom = torch._foreach_addcmul(v, a, a, value=-1)
            torch._foreach_add_(denom, group["epsilon"])
        else:
            denom = torch._foreach_add(v, group["epsilon"])
        torch._foreach_sqrt_(denom)
        if group["momentum"] > 0:
            mom = slots["momentum"]
            torch._foreach_mul_(mom, group["momentum"])
            torch._foreach_addcdiv_(mom, grads, denom, value=lr)
            torch._foreach_sub_(params, mom)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)


class Adamax(KerasOptimizer):
    """Keras Adamax: ``u = max(b2 * u, |g|)``; ``w -= lr * m / ((1 - b1^t) * (u + epsilon))``.

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = Adamax([w], lr=0.1)
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 6)
    -0.1
    """

    def __init__(
        self,
        params: Params,
        lr: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        b1, b2 = _betas(beta_1, beta_2)
        super().__init__(
            params,
            lr,
            {"beta_1": b1, "beta_2": b2, "epsilon": _number(epsilon, "epsilon")},
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )

    def _slots(self, group):
        return {"momentum": 0.0, "norm": 0.0}

    def _update(self, group, params, grads, slots, lr, step):
        b1, b2 = group["beta_1"], group["beta_2"]
        m, u = slots["momentum"], slots["norm"]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(u, b2)
        torch._foreach_maximum_(u, torch._foreach_abs(grads))
        denom = torch._foreach_add(u, group["epsilon"])
        torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - _f32(b1) ** step))


class Nadam(KerasOptimizer):
    """Keras Nadam (momentum schedule ``u_t = b1 * (1 - 0.5 * 0.96^t)``, running ``u_product``).

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = Nadam([w], lr=0.1)
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 4)
    -0.1063
    """

    _global_keys = ("iterations", "u_product")

    def __init__(
        self,
        params: Params,
        lr: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        b1, b2 = _betas(beta_1, beta_2)
        super().__init__(
            params,
            lr,
            {
                "beta_1": b1,
                "beta_2": b2,
                "epsilon": _number(epsilon, "epsilon"),
                "u_product": 1.0,
            },
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )

    @staticmethod
    def _u(beta_1: float, step: int) -> float:
        return _f32(beta_1) * (1.0 - 0.5 * _f32(0.96) ** step)

    def _slots(self, group):
        return {"momentum": 0.0, "velocity": 0.0}

    def _update(self, group, params, grads, slots, lr, step):
        b1, b2 = group["beta_1"], group["beta_2"]
        u_t, u_t_1 = self._u(b1, step), self._u(b1, step + 1)
        u_product_t = group["u_product"] * u_t
        u_product_t_1 = u_product_t * u_t_1
        m, v = slots["momentum"], slots["velocity"]
        # Keras's Nadam casts beta_1/beta_2 first and uses them in the moving averages too
        torch._foreach_lerp_(m, grads, 1 - _f32(b1))
        torch._foreach_mul_(v, _f32(b2))
        torch._foreach_addcmul_(v, grads, grads, value=1 - _f32(b2))
        m_hat = torch._foreach_mul(m, u_t_1 / (1 - u_product_t_1))
        torch._foreach_add_(m_hat, grads, alpha=(1 - u_t) / (1 - u_product_t))
        denom = torch._foreach_div(v, 1 - _f32(b2) ** step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["epsilon"])
        torch._foreach_addcdiv_(params, m_hat, denom, value=-lr)

    def _advance(self, group, step):
        # Keras multiplies u_product once per update, whether or not a group had gradients
        group["u_product"] = group["u_product"] * self._u(group["beta_1"], step)
        group["iterations"] = step


class Adagrad(KerasOptimizer):
    """Keras Adagrad: ``acc += g^2``; ``w -= lr * g / sqrt(acc + epsilon)``; ``acc`` starts at 0.1.

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = Adagrad([w], lr=0.1, initial_accumulator_value=0.0)
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 6)
    -0.1
    """

    def __init__(
        self,
        params: Params,
        lr: Rate = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        init = _number(initial_accumulator_value, "initial_accumulator_value")
        super().__init__(
            params,
            lr,
            {"initial_accumulator_value": init, "epsilon": _number(epsilon, "epsilon")},
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )

    def _slots(self, group):
        return {"accumulator": group["initial_accumulator_value"]}

    def _update(self, group, params, grads, slots, lr, step):
        acc = slots["accumulator"]
        torch._foreach_addcmul_(acc, grads, grads)
        denom = torch._foreach_add(acc, group["epsilon"])
        torch._foreach_sqrt_(denom)
        torch._foreach_addcdiv_(params, grads, denom, value=-lr)


class Lion(KerasOptimizer):
    """Keras Lion: ``w -= lr * sign(b1 * m + (1 - b1) * g)``; ``m = b2 * m + (1 - b2) * g``.

    >>> w = torch.nn.Parameter(torch.zeros(2)); opt = Lion([w], lr=0.1)
    >>> w.grad = torch.tensor([3.0, -0.5]); opt.step(); w.detach().tolist()
    [-0.10000000149011612, 0.10000000149011612]
    """

    def __init__(
        self,
        params: Params,
        lr: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        b1, b2 = _betas(beta_1, beta_2)
        if b1 <= 0:
            raise ValueError(f"beta_1 must be in (0, 1] for Lion, got {beta_1!r}")
        super().__init__(
            params,
            lr,
            {"beta_1": b1, "beta_2": b2},
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )

    def _slots(self, group):
        return {"momentum": 0.0}

    def _update(self, group, params, grads, slots, lr, step):
        b1, b2 = _f32(group["beta_1"]), _f32(group["beta_2"])  # cast, as in Keras
        m = slots["momentum"]
        direction = torch._foreach_mul(m, b1)
        torch._foreach_add_(direction, grads, alpha=1 - b1)
        torch._foreach_sign_(direction)
        torch._foreach_add_(params, direction, alpha=-lr)
        torch._foreach_mul_(m, b2)
        torch._foreach_add_(m, grads, alpha=1 - b2)
