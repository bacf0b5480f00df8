"""What ``compile`` asks to minimise and report: losses (one per output) and metrics.

Single output: ``loss="sparse_categorical_crossentropy", metrics=["accuracy"]``.
Several outputs (a model returning a dict or tuple): ``loss={"a": ..., "b": ...}``
or ``loss=[..., ...]``, ``loss_weights={"a": 1.0, "b": 0.5}``,
``metrics={"a": ["accuracy"]}``; logs get Keras names (``a_loss``, ``a_accuracy``,
``0_loss`` for the first of a tuple).

Outputs meet targets as in Keras: a list or tuple of outputs by position (targets as
a list, a tuple, ``{0: ya, 1: yb}``, or a Dataset yielding several targets), a dict by
name (or by position, in the model's output order), and a one-key dict or Hugging
Face ``ModelOutput`` as its tensor, so one loss just works on
``BertForSequenceClassification``. Every mismatch names what the model gave and what
the targets were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from frostline.api import losses as losses_mod
from frostline.api import metrics as metrics_mod


def describe(obj) -> str:
    """What a model gave or a batch held, for error messages.

    >>> describe((torch.zeros(8, 3), {"a": torch.zeros(8)}))
    "a tuple of 2: [0] a tensor (8, 3), [1] a dict: 'a' a tensor (8,)"
    """
    if obj is None:
        return "nothing (None)"
    if isinstance(obj, torch.Tensor):
        return f"a tensor {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        kind = "a dict" if type(obj) is dict else f"a {type(obj).__name__}"
        return f"{kind}: " + ", ".join(f"{k!r} {describe(v)}" for k, v in obj.items())
    if isinstance(obj, list | tuple):
        items = ", ".join(f"[{i}] {describe(v)}" for i, v in enumerate(obj))
        return f"a {type(obj).__name__} of {len(obj)}: {items}"
    return type(obj).__name__


class Objective:
    def __init__(
        self,
        loss,
        metrics=None,
        loss_weights=None,
        module: nn.Module | None = None,
        weighted_metrics=None,
    ) -> None:
        if loss is None:
            raise ValueError(
                "compile() needs a loss, e.g. loss='sparse_categorical_crossentropy' or a callable loss(y_pred, y_true)"
            )
        self.multi = isinstance(loss, Mapping | list | tuple)
        if isinstance(loss, Mapping):
            self.keys: list = list(loss)
            self.losses = {k: losses_mod.get(v) for k, v in loss.items()}
        elif isinstance(loss, list | tuple):
            self.keys = list(range(len(loss)))
            self.losses = {i: losses_mod.get(v) for i, v in enumerate(loss)}
        else:
            self.keys = [None]
            self.losses = {None: losses_mod.get(loss)}
        self.weights = self._weights(loss_weights)
        if module is not None:
            for fn in self.losses.values():
                fn.configure(module)
        self.metrics = self._metrics(metrics)
        self.weighted_metrics = self._metrics(weighted_metrics, "weighted_metrics")
        for ms in self.weighted_metrics.values():
            for m in ms:
                if isinstance(m, metrics_mod.TorchMetric):
                    raise TypeError(
                        f"weighted_metrics: the torchmetrics metric {m.name!r} takes no sample "
                        "weights; list it in metrics= instead"
                    )
        self._log_names = self._names()
        self.reset()

    def _weights(self, lw) -> dict:
        if lw is None:
            return {k: 1.0 for k in self.keys}
        if not self.multi:
            raise ValueError(
                "loss_weights is for models with several outputs (loss given as a dict or list)"
            )
        if isinstance(lw, Mapping):
            unknown = set(lw) - set(self.keys)
            if unknown:
                raise ValueError(
                    f"loss_weights names outputs {sorted(map(str, unknown))} that have no loss; outputs: {self.keys}"
                )
            return {k: float(lw.get(k, 1.0)) for k in self.keys}
        if isinstance(lw, Sequence) and len(lw) == len(self.keys):
            return dict(zip(self.keys, map(float, lw)))
        raise ValueError(
            f"loss_weights must be a dict or a list with one weight per output ({len(self.keys)}), got {lw!r}"
        )

    def _metrics(self, metrics, what: str = "metrics") -> dict:
        out: dict = {k: [] for k in self.keys}
        if metrics is None:
            return out
        if isinstance(metrics, Mapping):
            for k, ms in metrics.items():
                if k not in out:
                    raise ValueError(
                        f"{what} names output {k!r}, which has no loss; outputs: {self.keys}"
                    )
                out[k] = [metrics_mod.get(m) for m in ([ms] if isinstance(ms, str) else ms)]
            return out
        if isinstance(metrics, str):
            metrics = [metrics]
        for k in self.keys:
            out[k] = [metrics_mod.get(m) for m in metrics]
        return out

    def _names(self) -> dict[tuple[bool, object, int], str]:
        """Each metric's log name, as Keras names them: ``<output>_<name>``; a weighted
        metric whose name is taken by an unweighted one becomes ``weighted_<name>``
        (then ``_1``, ``_2``, ... for further repeats)."""
        names: dict[tuple[bool, object, int], str] = {}
        seen: dict[str, int] = {}
        for weighted, table in ((False, self.metrics), (True, self.weighted_metrics)):
            for k, ms in table.items():
                for i, m in enumerate(ms):
                    name = self._name(k, m.name)
                    if name in seen:
                        if weighted:
                            name = self._name(k, f"weighted_{m.name}")
                        if name in seen:
                            seen[name] += 1
                            name = f"{name}_{seen[name] - 1}"
                    seen.setdefault(name, 1)
                    names[(weighted, k, i)] = name
        return names

    def _all_metrics(self):
        """``(log name, output key, metric, weighted)`` for every compiled metric."""
        for weighted, table in ((False, self.metrics), (True, self.weighted_metrics)):
            for k, ms in table.items():
                for i, m in enumerate(ms):
                    yield self._log_names[(weighted, k, i)], k, m, weighted

    # -- helpers -------------------------------------------------------------------
    def direction(self, log_key: str) -> str | None:
        """``"down"`` for a loss, the metric's ``direction`` for a metric, None if unknown.

        >>> Objective("mse", metrics=["accuracy", "mae"]).direction("val_accuracy")
        'up'
        >>> Objective("mse").direction("val_loss"), Objective("mse").direction("lr")
        ('down', None)
        """
        name = log_key.removeprefix("val_")
        if name == "loss" or any(name == self._name(k, "loss") for k in self.keys):
            return "down"
        for log_name, _, m, _ in self._all_metrics():
            if log_name == name:
                return m.direction
        return None

    def _name(self, key, base: str) -> str:
        return base if key is None else f"{key}_{base}"

    def _wanted(self) -> str:
        if not self.multi:
            return "one loss"
        if isinstance(self.keys[0], int):
            return f"a list of {len(self.keys)} losses (by position)"
        return "losses for " + ", ".join(repr(k) for k in self.keys)

    def _mismatch(self, problem: str, outputs, targets) -> ValueError:
        return ValueError(
            f"{problem}. The model gave {describe(outputs)}; the targets came as "
            f"{describe(targets)}; compile() has {self._wanted()}. Outputs meet targets as in "
            "Keras: lists and tuples by position, dicts by name, a one-key dict or ModelOutput "
            "as its tensor"
        )

    def _output(self, outputs, key, targets):
        """The model output the loss for ``key`` (None: the only loss) is computed on."""
        if key is None:
            if isinstance(outputs, torch.Tensor):
                return outputs
            if isinstance(outputs, Mapping | list | tuple) and len(outputs) == 1:
                return next(iter(outputs.values())) if isinstance(outputs, Mapping) else outputs[0]
            example = (
                "loss={" + ", ".join(f"{k!r}: ..." for k in outputs) + "}"
                if isinstance(outputs, Mapping)
                else "loss=[" + ", ".join("..." for _ in outputs) + "]"
                if isinstance(outputs, list | tuple)
                else "a loss for a tensor output"
            )
            raise self._mismatch(
                f"one loss for several outputs: compile with one loss per output, e.g. {example}",
                outputs,
                targets,
            )
        if isinstance(outputs, Mapping):
            if key in outputs:
                return outputs[key]
            if isinstance(key, int) and 0 <= key < len(outputs):
                return list(outputs.values())[key]
        elif isinstance(outputs, list | tuple):
            if isinstance(key, int) and 0 <= key < len(outputs):
                return outputs[key]
        elif isinstance(outputs, torch.Tensor) and len(self.keys) == 1:
            return outputs
        raise self._mismatch(
            f"there is a loss for output {key!r} but no such output", outputs, targets
        )

    def _target(self, targets, key, outputs):
        """The targets for the loss of ``key``: by position, by name, or the only one."""
        if targets is None:
            raise ValueError("fit needs targets y for the loss (got y=None)")
        if isinstance(targets, torch.Tensor):
            if len(self.keys) == 1:
                return targets
            raise self._mismatch(
                f"1 target for {len(self.keys)} losses: give one target per output",
                outputs,
                targets,
            )
        n = len(targets)
        if key is None:
            if n == 1:
                return next(iter(targets.values())) if isinstance(targets, Mapping) else targets[0]
            raise self._mismatch(f"{n} targets for one loss", outputs, targets)
        if isinstance(targets, Mapping):
            for k in (key, str(key)):
                if k in targets:
                    return targets[k]
            if n == 1 and len(self.keys) == 1:
                return next(iter(targets.values()))
            raise self._mismatch(f"no target named {key!r}", outputs, targets)
        # a list or tuple: by position (output order for dict outputs, else loss order)
        order = list(self.keys)
        if isinstance(outputs, Mapping) and n == len(outputs) and key in outputs:
            order = list(outputs)
        if n != len(order):
            what = f"{n} target" + ("s" if n != 1 else "")
            raise self._mismatch(f"{what} for {len(order)} outputs", outputs, targets)
        return targets[order.index(key)]

    # -- loss ----------------------------------------------------------------------
    def _weights_for(self, sample_weight, key, outputs):
        """The sample weights of output ``key``: one tensor for every output, or one per
        output (a dict by name or a list/tuple by position, as targets)."""
        if sample_weight is None or isinstance(sample_weight, torch.Tensor):
            return sample_weight
        return self._target(sample_weight, key, outputs)

    def __call__(
        self, outputs, targets, sample_weight=None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The total loss (weighted by ``loss_weights``) and, for several outputs, each
        output's loss; ``sample_weight`` weighs each sample's loss as Keras does."""
        total = None
        parts: dict[str, float] = {}
        for k in self.keys:
            pred = self._output(outputs, k, targets)
            true = self._target(targets, k, outputs)
            if not isinstance(pred, torch.Tensor):
                raise self._mismatch(f"output {k!r} is not a tensor", outputs, targets)
            pred = pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred
            sw = self._weights_for(sample_weight, k, outputs)
            value = (
                self.losses[k](pred, true)
                if sw is None
                else self.losses[k].weighted(pred, true, sw)
            )
            if self.multi:
                parts[self._name(k, "loss")] = float(value.detach())
            term = value * self.weights[k]
            total = term if total is None else total + term
        assert total is not None
        return total, parts

    # -- metrics -------------------------------------------------------------------
    def reset(self) -> None:
        self._loss_sum = 0.0
        self._parts_sum: dict[str, float] = {}
        self._count = 0
        for _, _, m, _ in self._all_metrics():
            m.reset()

    def update(
        self, outputs, targets, loss: float, parts: dict[str, float], n: int, sample_weight=None
    ) -> None:
        """Add a batch of ``n`` samples: the losses count per sample (Keras's loss
        tracker), ``metrics`` unweighted and ``weighted_metrics`` with ``sample_weight``."""
        self._loss_sum += loss * n
        for k, v in parts.items():
            self._parts_sum[k] = self._parts_sum.get(k, 0.0) + v * n
        self._count += n
        for _, k, m, weighted in self._all_metrics():
            pred = self._output(outputs, k, targets)
            true = self._target(targets, k, outputs)
            if weighted and sample_weight is not None:
                m.update(pred.float(), true, self._weights_for(sample_weight, k, outputs))
            else:
                m.update(pred.float(), true)

    def results(self) -> dict[str, float]:
        n = self._count
        logs = {"loss": self._loss_sum / n if n else math.nan}
        for k, v in self._parts_sum.items():
            logs[k] = v / n
        for name, _, m, _ in self._all_metrics():
            logs[name] = float(m.result())
        return logs

    def load_state(self, state: dict) -> None:
        """Put back the running sums :meth:`state` gave (a resume inside an epoch)."""
        metrics = {name: m for name, _, m, _ in self._all_metrics()}
        for name, (total, count) in state.items():
            if name == "loss":
                self._loss_sum, self._count = float(total), int(count)
            elif name in metrics:
                metrics[name].set_state(float(total), float(count))
            else:
                self._parts_sum[name] = float(total)

    def state(self) -> dict[str, tuple[float, float]]:
        """Sums and counts, for averaging across processes."""
        st: dict[str, tuple[float, float]] = {"loss": (self._loss_sum, self._count)}
        for k, v in self._parts_sum.items():
            st[k] = (v, self._count)
        for name, _, m, _ in self._all_metrics():
            if hasattr(m, "merge_state") and not isinstance(m, metrics_mod.TorchMetric):
                st[name] = m.merge_state()
        return st
