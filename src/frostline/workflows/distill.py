"""Knowledge distillation on top of ``Model.fit``: a frozen teacher, a trained student.

:func:`distill` builds one module that runs the teacher, then the student, and returns
both outputs side by side; the teacher is frozen (``trainable=False``) and always in
eval mode (dropout off, BatchNorm on running statistics). Because the teacher is the
model's first stage and frozen, frostline's frozen-prefix machinery takes it from
there: it runs without autograd and, on in-memory data, its outputs are computed once
and reused in every later epoch (the fit log says ``cache: built`` then ``reused``).
The loss is Hinton et al.'s::

    alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

(only the first term, at full weight, when there are no labels). The teacher is checked
bitwise unchanged afterwards, and its ``trainable`` flags and train/eval mode are put
back as they were.

>>> import numpy as np, torch, frostline as fl
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
>>> student = nn.Sequential(nn.Linear(8, 3))
>>> x = np.random.rand(128, 8).astype("float32"); y = np.random.randint(0, 3, 128)
>>> h = distill(student, teacher, x, y, temperature=2.0, alpha=0.7, epochs=3, verbose=0)
>>> sorted(h.history)
['accuracy', 'agreement', 'epoch_time', 'kl', 'loss']
>>> h.history["kl"][-1] < h.history["kl"][0]
True
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frostline.api.callbacks import History
from frostline.api.layer import Layer
from frostline.api.losses import Loss, SparseCategoricalCrossentropy
from frostline.api.metrics import Metric
from frostline.api.model import Model
from frostline.core.digest import tensor_digest
from frostline.core.freezing import set_module_trainable
from frostline.core.state import own_flag, set_own_flag
from frostline.engine.verify import FrozenWeightsChanged

__all__ = ["DistillationLoss", "DistillationModule", "distill"]


class _Packing:
    """How the student stage unpacks ``[x | teacher logits]`` rows (set by the teacher stage)."""

    x_shape: tuple[int, ...] = ()
    x_dtype: torch.dtype = torch.float32
    n_x: int = 0

    def __deepcopy__(self, memo: dict) -> _Packing:
        return self  # shared by both stages, also in copies of one (frostline's fused prefix)


class _TeacherStage(nn.Module):
    """``x -> [x.flatten(1) | teacher(x)]``: one tensor, so the cache can hold it."""

    def __init__(self, teacher: nn.Module, packing: _Packing) -> None:
        super().__init__()
        self.net = teacher
        self._packing = packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"distill needs tensor inputs, got {type(x).__name__}")
        pk = self._packing
        pk.x_shape, pk.x_dtype, pk.n_x = tuple(x.shape[1:]), x.dtype, int(math.prod(x.shape[1:]))
        t = self.net(x)
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"the teacher must return logits of shape (batch, classes), got {shape}"
            )
        return torch.cat([x.reshape(len(x), -1).float(), t.detach().float()], dim=1)


class _StudentStage(nn.Module):
    """``[x | teacher logits] -> [student(x) | teacher logits]``."""

    def __init__(self, student: nn.Module, packing: _Packing) -> None:
        super().__init__()
        self.net = student
        self._packing = packing

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        pk = self._packing
        x = packed[:, : pk.n_x].reshape(len(packed), *pk.x_shape)
        if not pk.x_dtype.is_floating_point:
            x = x.round()
        x = x.to(pk.x_dtype)
        t = packed[:, pk.n_x :]
        s = self.net(x)
        if not isinstance(s, torch.Tensor) or s.shape != t.shape:
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"the student must return logits shaped like the teacher's {tuple(t.shape)}, got {shape}"
            )
        return torch.cat([s.float(), t], dim=1)


class DistillationModule(nn.Sequential):
    """Teacher stage, then student stage; returns ``[student logits | teacher logits]``.

    The teacher stays in eval mode whatever ``train()`` says.

    >>> m = DistillationModule(nn.Linear(4, 3), nn.Linear(4, 3))
    >>> m.train().teacher.training, m(torch.zeros(2, 4)).shape
    (False, torch.Size([2, 6]))
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        packing = _Packing()
        super().__init__(
            OrderedDict(
                teacher=_TeacherStage(teacher, packing), student=_StudentStage(student, packing)
            )
        )

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self[0].eval()  # the teacher stage
        return self


def _split(y_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = y_pred.shape[1] // 2
    return y_pred[:, :c], y_pred[:, c:]


class DistillationLoss(Loss):
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)`` on packed outputs."""

    name = "distillation"

    def __init__(
        self, temperature: float = 4.0, alpha: float = 0.5, hard_labels: bool = True
    ) -> None:
        super().__init__(from_logits=True)
        self.temperature = float(temperature)
        self.alpha = float(alpha) if hard_labels else 1.0
        self.hard_labels = hard_labels
        self._ce = SparseCategoricalCrossentropy(from_logits=True)

    def configure(self, model_module: nn.Module) -> None:
        pass

    def __call__(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        s, t = _split(y_pred.float())
        temp = self.temperature
        soft = F.kl_div(
            F.log_softmax(s / temp, 1),
            F.log_softmax(t / temp, 1),
            log_target=True,
            reduction="batchmean",
        )
        loss = soft * (temp * temp)
        if self.alpha >= 1.0:
            return loss
        return self.alpha * loss + (1.0 - self.alpha) * self._ce(s, y_true)


class _StudentAccuracy(Metric):
    name = "accuracy"

    def values(self, y_pred, y_true):
        s, _ = _split(y_pred)
        return (s.argmax(1) == y_true.reshape(-1).long()).float()


class _TeacherKL(Metric):
    """Per-sample KL(teacher || student) at temperature 1."""

    name = "kl"

    def values(self, y_pred, y_true):
        s, t = _split(y_pred)
        lt = F.log_softmax(t, 1)
        return (lt.exp() * (lt - F.log_softmax(s, 1))).sum(1)


class _Agreement(Metric):
    name = "agreement"

    def values(self, y_pred, y_true):
        s, t = _split(y_pred)
        return (s.argmax(1) == t.argmax(1)).float()


def _module_of(obj: Any, what: str) -> nn.Module:
    if isinstance(obj, Layer):
        return obj.module
    if isinstance(obj, nn.Module):
        return obj
    raise TypeError(
        f"{what} must be a torch.nn.Module or a frostline Layer/Model, got {type(obj).__name__}"
    )


def _digests(module: nn.Module) -> dict[str, str]:
    out = {n: tensor_digest(p) for n, p in module.named_parameters(remove_duplicate=False)}
    out.update(
        {
            f"{n} (buffer)": tensor_digest(b)
            for n, b in module.named_buffers(remove_duplicate=False)
            if b is not None
        }
    )
    return out


def _n_samples(x: Any) -> int | None:
    if isinstance(x, np.ndarray | torch.Tensor):
        return len(x)
    if isinstance(x, list | tuple):
        return len(x)
    return None


def _labels_or_dummy(x: Any, y: Any, what: str) -> Any:
    if y is not None:
        return y
    n = _n_samples(x)
    if n is None:
        raise ValueError(
            f"{what}: without labels, pass arrays or tensors (a Dataset or DataLoader must yield (x, y))"
        )
    return np.zeros(n, dtype=np.int64)


def distill(
    student: nn.Module | Layer,
    teacher: nn.Module | Layer,
    x: Any,
    y: Any = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
    epochs: int = 1,
    optimizer: Any = "adam",
    batch_size: int | None = None,
    validation_data: Any = None,
    validation_split: float = 0.0,
    callbacks: Iterable | None = None,
    verbose: Any = "auto",
    device: Any = None,
    precision: str | None = None,
    **fit_kwargs: Any,
) -> History:
    """Train ``student`` to match a frozen ``teacher`` (and the labels ``y``, when given).

    Both return logits of the same shape. ``alpha`` weighs the soft (teacher) term
    against hard-label cross-entropy; without ``y`` only the soft term is used. The
    History has ``loss``, ``kl`` (KL(teacher || student) at T=1), ``agreement``
    (student's top-1 equals the teacher's) and, with labels, ``accuracy`` (plus
    ``val_*``). The student is trained in place; the teacher ends bitwise unchanged
    (else :class:`~frostline.engine.verify.FrozenWeightsChanged`). ``fit_kwargs`` go to
    ``Model.fit`` (``seed``, ``cache``, ``shuffle``, ...). See the module docstring
    for an example.
    """
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the teacher term), got {alpha!r}")
    s_mod, t_mod = _module_of(student, "student"), _module_of(teacher, "teacher")
    if (
        s_mod is t_mod
        or any(m is t_mod for m in s_mod.modules())
        or any(m is s_mod for m in t_mod.modules())
    ):
        raise ValueError(
            "student and teacher must be separate modules (neither may contain the other)"
        )
    shared = {id(p) for p in s_mod.parameters()} & {id(p) for p in t_mod.parameters()}
    if shared:
        raise ValueError(
            f"student and teacher share {len(shared)} parameter tensor(s); the teacher must stay frozen"
        )

    hard = y is not None
    y = _labels_or_dummy(x, y, "distill")
    if (
        validation_data is not None
        and isinstance(validation_data, tuple | list)
        and len(validation_data) == 2
    ):
        validation_data = (
            validation_data[0],
            _labels_or_dummy(validation_data[0], validation_data[1], "validation_data"),
        )

    flags = {m: own_flag(m) for m in t_mod.modules()}
    grads = {p: p.requires_grad for p in t_mod.parameters()}
    was_training = t_mod.training
    before = _digests(t_mod)
    set_module_trainable(t_mod, False)
    try:
        model = Model(DistillationModule(s_mod, t_mod), name="distillation")
        metrics: list = [_TeacherKL(), _Agreement()]
        if hard:
            metrics.insert(0, _StudentAccuracy())
        model.compile(
            optimizer=optimizer,
            loss=DistillationLoss(temperature, alpha, hard_labels=hard),
            metrics=metrics,
            device=device,
            precision=precision,
        )
        history = model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            validation_data=validation_data,
            **fit_kwargs,
        )
    finally:
        for m, flag in flags.items():
            set_own_flag(m, flag)
        for p, rg in grads.items():
            p.requires_grad_(rg)
        t_mod.train(was_training)
    after = _digests(t_mod)
    moved = [n for n, d in before.items() if after.get(n) != d]
    if moved:
        raise FrozenWeightsChanged(
            f"the teacher changed during distillation: {', '.join(moved[:10])}"
        )
    return history
