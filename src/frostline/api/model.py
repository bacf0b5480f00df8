"""Models: a Layer that can be compiled, trained, evaluated, saved."""

from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline.api import optimizers as optimizers_mod
from frostline.api import saving
from frostline.api.callbacks import History
from frostline.api.export import export as export_model
from frostline.api.layer import Layer, SequentialModule, snake_case
from frostline.api.objective import Objective
from frostline.api.summary import counts, format_size, print_summary, render
from frostline.core import batchnorm
from frostline.core.state import clear_learning_rates, set_view
from frostline.engine.fit_options import FitOptions
from frostline.engine.live import LiveOptimizer
from frostline.engine.runner import CacheOptions, CacheStatus
from frostline.engine.trainer import Trainer, TrainingError
from frostline.engine.verify import Report


@dataclass
class CompileConfig:
    optimizer: optimizers_mod.Optimizer
    objective: Objective
    device: torch.device
    precision: str | None
    scheduler: Callable | None
    scheduler_interval: str
    find_unused_parameters: bool
    scaler: Any = None


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}"
        ) from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for, but CUDA is not available on this machine"
        )
    return d


def _unknown_keywords(name: str, unknown: dict, method: Callable) -> TypeError:
    """The TypeError for keywords ``method`` does not take, naming those it takes."""
    valid = [
        p.name
        for p in inspect.signature(method).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return TypeError(
        f"{name}() got unknown keyword argument(s) {', '.join(hints)}; "
        f"{name} takes: {', '.join(valid)}"
    )


def parameters_of(spec: Any, what: str = "layers") -> list[torch.Tensor]:
    """The parameters of a Layer, an ``nn.Module``, a parameter, or a list of those.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 3)
        >>> [tuple(p.shape) for p in parameters_of([lin, nn.Parameter(torch.zeros(4))])]
        [(3, 2), (3,), (4,)]
    """
    if isinstance(spec, Layer):
        return list(spec.module.parameters())
    if isinstance(spec, nn.Module):
        return list(spec.parameters())
    if isinstance(spec, torch.Tensor):
        return [spec]
    if isinstance(spec, list | tuple | set):
        return [p for item in spec for p in parameters_of(item, what)]
    raise TypeError(
        f"{what} must be a Layer, an nn.Module, a parameter or a list of them, "
        f"got {type(spec).__name__}"
    )


class Model(Layer):
    """A trainable Keras-style model around any ``torch.nn.Module``.

    >>> import numpy as np, frostline as fl
    >>> model = fl.wrap(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)))
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    >>> x, y = np.random.rand(64, 4).astype("float32"), np.random.randint(0, 3, 64)
    >>> history = model.fit(x, y, epochs=2, verbose=0)
    >>> sorted(history.history)
    ['accuracy', 'epoch_time', 'loss']
    """

    def __init__(self, module: nn.Module, name: str | None = None) -> None:
        super().__init__(
            module, name=name if name is not None else snake_case(type(module).__name__)
        )
        set_view(module, self)
        batchnorm.install_all(module)
        self._config: CompileConfig | None = None
        self._live: LiveOptimizer | None = None
        self._trainer: Trainer | None = None
        self.stop_training = False
        self.history: History | None = None
        self.last_verification: Report | None = None
        self.meta: dict[str, Any] = {}

    def __call__(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def to(self, device) -> Model:
        self._module.to(device)
        return self

    # -- compile -------------------------------------------------------------------
    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        metrics=None,
        loss_weights=None,
        weighted_metrics=None,
        *,
        device=None,
        precision: str | None = None,
        scheduler: Callable | None = None,
        scheduler_interval: str = "epoch",
        find_unused_parameters: bool = False,
    ) -> None:
        """Configure training; builds a new optimizer (state starts fresh, as in Keras).

        Every parameter starts at this optimizer's rate: rates given earlier with
        ``unfreeze(..., learning_rate=...)`` are cleared (give them after compiling).

        ``weighted_metrics``: metrics (as ``metrics``) weighted by ``fit``'s and
        ``evaluate``'s ``sample_weight``/``class_weight``, named as Keras names them
        (``weighted_accuracy`` where ``accuracy`` is also an unweighted metric).
        ``precision``: None (float32), ``"bf16"`` or ``"fp16"`` autocast.
        ``scheduler``: a factory ``optimizer -> torch LR scheduler``; it is rebuilt and
        fast-forwarded when layers are frozen or unfrozen.

        >>> import frostline as fl
        >>> m = fl.wrap(nn.Linear(2, 2)); m.compile(fl.optimizers.SGD(0.1, momentum=0.9), loss="mse")
        >>> m.learning_rate
        0.1
        """
        spec = optimizers_mod.get(optimizer)
        if precision not in (None, "32", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"):
            raise ValueError(f"precision must be None, 'bf16' or 'fp16', got {precision!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        if scheduler is not None and not callable(scheduler):
            raise TypeError(
                f"scheduler must be a callable optimizer -> LRScheduler, got {scheduler!r}"
            )
        dev = _resolve_device(device)
        scaler = None
        if precision in ("fp16", "float16") and dev.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        self._config = CompileConfig(
            optimizer=spec,
            objective=Objective(loss, metrics, loss_weights, self._module, weighted_metrics),
            device=dev,
            precision=precision,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            find_unused_parameters=find_unused_parameters,
            scaler=scaler,
        )
        clear_learning_rates(self._module)
        self._live = LiveOptimizer(spec, self._module, scheduler=scheduler)

    @property
    def compiled(self) -> bool:
        return self._config is not None

    @property
    def compile_config(self) -> CompileConfig | None:
        """What ``compile`` set (optimizer spec, objective, device, precision, ...), or None."""
        return self._config

    @property
    def live_optimizer(self) -> LiveOptimizer | None:
        """The optimizer that follows the trainable set (None before ``compile``)."""
        return self._live

    @property
    def cache_status(self) -> dict[str, CacheStatus]:
        """The typed cache status of each kind of data (``"train"``, ``"val"``, ``"evaluate"``)
        in the last ``fit``/``evaluate``; ``str()`` of one is the epoch log's wording.

        >>> import frostline as fl
        >>> from torch import nn
        >>> fl.Sequential([nn.Linear(2, 2)]).cache_status
        {}
        """
        runner = self._trainer.runner if self._trainer is not None else None
        return dict(runner.status) if runner is not None else {}

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer ``fit`` uses (None before the first step)."""
        return self._live.optimizer if self._live is not None else None

    @property
    def learning_rate(self) -> float:
        """The headline learning rate (groups with their own rate keep their ratio to it)."""
        if self._live is None:
            raise RuntimeError("the model is not compiled, so it has no learning rate yet")
        return self._live.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        if self._live is None:
            raise RuntimeError("compile the model before setting its learning rate")
        self._live.set_learning_rate(value)

    def _get_trainer(self) -> Trainer:
        if self._trainer is None:
            self._trainer = Trainer(self)
        return self._trainer

    # -- training ------------------------------------------------------------------
    def fit(
        self,
        x=None,
        y=None,
        batch_size: int | None = None,
        epochs: int = 1,
        verbose="auto",
        callbacks: Iterable | None = None,
        validation_split: float = 0.0,
        validation_data=None,
        shuffle: bool = True,
        class_weight: dict | None = None,
        sample_weight=None,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        validation_steps: int | None = None,
        validation_batch_size: int | None = None,
        validation_freq: int | Sequence[int] = 1,
        *,
        seed: int | None = None,
        cache: bool | str = "auto",
        cache_memory_bytes: int = 2 << 30,
        cache_dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        frozen_inference: bool = False,
        augment_views: int | None = None,
        cache_options: CacheOptions | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        keep_checkpoints: int = 3,
        resume: str | os.PathLike | None = None,
        verify_frozen: bool = True,
        on_nan: str = "raise",
        unfreeze_next: Any = None,
        workers: int = 0,
        **unknown: Any,
    ) -> History:
        """Train; returns a History (``history.history["loss"]`` etc.).

        The arguments are Keras 3's, in its order, with its meaning: ``class_weight``
        (``{class: weight}``, one output) and ``sample_weight`` (one weight per sample;
        a Dataset or loader gives them as a third item element, ``(x, y, sample_weight)``)
        weigh each sample's loss, reduced as Keras reduces it (the sum of the weighted
        losses over the batch size); ``validation_data`` may be ``(x, y, sample_weight)``;
        ``steps_per_epoch`` makes an epoch that many batches, the next one going on where
        the last stopped; ``validation_steps`` and ``validation_batch_size`` bound the
        validation run, done at the epochs ``validation_freq`` says (every N-th, or the
        1-based epochs listed).

        frostline's keywords (keyword-only; any other keyword is a TypeError naming these):
        ``seed``; the frozen part's cache: ``cache`` (True/False/"auto"),
        ``cache_memory_bytes`` (what the cache holds in memory before it spills to
        ``cache_dir``, the system's temporary folder when None), ``cache_dtype`` (the
        dtype floating-point frontier tensors are stored in), or all of them as one
        ``cache_options=fl.CacheOptions(...)``, carried unchanged to the engine (not
        together with those keywords); ``checkpoint_dir``, ``keep_checkpoints``,
        ``resume``, ``verify_frozen``, ``on_nan`` ("raise"/"stop"), ``frozen_inference``
        (run the frozen part in inference mode, as Keras' ``base(x, training=False)``: its
        dropout/DropPath off, so it is deterministic and its outputs can be cached),
        ``unfreeze_next`` (the layers the next fit will unfreeze: a Layer, module,
        parameter or a list of them; this fit's cache build then also keeps the frozen
        values right below them, and the next fit starts from those instead of running
        the frozen part over the data again; :func:`~frostline.recipes.two_phase` passes
        it for you), ``augment_views`` (``K``: where random augmentation runs in front of
        the frozen part, cache ``K`` augmented passes over the data and cycle them, epoch
        ``e`` seeing pass ``e % K``; this changes augmentation's semantics, from a fresh
        draw every epoch to K draws per sample, and takes K times the cache's memory;
        ``None``, the default, draws afresh every epoch and caches nothing random),
        ``workers`` (``N``: a map-style ``Dataset`` is read by ``N`` worker processes, a
        ``DataLoader`` over each epoch's batches, while the activation cache does not serve
        the epoch; a random ``__getitem__`` then draws from the workers' generators, seeded
        from ``seed``; a ``DataLoader`` you pass keeps its own ``num_workers``).
        ``x`` may be an array, a tuple of arrays (positional model inputs) or a dict of
        arrays (keyword inputs such as ``input_ids`` and ``attention_mask``).

        >>> import numpy as np, frostline as fl
        >>> m = fl.wrap(nn.Linear(3, 2)); m.compile("sgd", "sparse_categorical_crossentropy")
        >>> h = m.fit(np.ones((8, 3), "float32"), np.array([0, 1] * 4), class_weight={1: 3.0},
        ...           epochs=2, verbose=0)
        >>> len(h.history["loss"])
        2
        """
        if unknown:
            raise _unknown_keywords("fit", unknown, self.fit)
        options = CacheOptions.of(
            cache_options,
            cache=cache,
            cache_memory_bytes=cache_memory_bytes,
            cache_dtype=cache_dtype,
            cache_dir=cache_dir,
            frozen_inference=frozen_inference,
            augment_views=augment_views,
        )
        if self._config is None:
            raise TrainingError("call model.compile(optimizer=..., loss=...) before fit()")
        opts = FitOptions(
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            validation_data=validation_data,
            shuffle=shuffle,
            class_weight=class_weight,
            sample_weight=sample_weight,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_steps=validation_steps,
            validation_batch_size=validation_batch_size,
            validation_freq=validation_freq,
            seed=seed,
            cache_options=options,
            checkpoint_dir=checkpoint_dir,
            keep_checkpoints=keep_checkpoints,
            resume=resume,
            verify_frozen=verify_frozen,
            on_nan=on_nan,
            unfreeze_next=(
                () if unfreeze_next is None else parameters_of(unfreeze_next, "unfreeze_next")
            ),
            workers=workers,
        )
        return self._get_trainer().fit(x, y, opts)

    def evaluate(
        self,
        x=None,
        y=None,
        batch_size: int | None = None,
        verbose="auto",
        sample_weight=None,
        steps: int | None = None,
        callbacks=None,
        return_dict: bool = False,
    ):
        """Loss and metrics on data (a scalar, a list, or a dict with ``return_dict=True``);
        ``sample_weight`` and ``steps`` (the first that many batches) as in Keras."""
        return self._get_trainer().evaluate(
            x,
            y,
            batch_size=batch_size,
            verbose=verbose,
            sample_weight=sample_weight,
            steps=steps,
            return_dict=return_dict,
            callbacks=callbacks,
        )

    def predict(
        self, x, batch_size: int | None = None, verbose=0, steps: int | None = None, callbacks=None
    ):
        """Outputs for ``x`` as a NumPy array (a dict/tuple of arrays for several outputs);
        ``steps``: only the first that many batches."""
        return self._get_trainer().predict(
            x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks
        )

    # -- reporting -----------------------------------------------------------------
    def summary(
        self,
        depth: int | None = 1,
        expand_nested: bool = False,
        leaves: bool = False,
        input_shape: Sequence[int] | None = None,
        line_length: int = 100,
        print_fn: Callable[[str], object] | None = None,
        input_dtype: torch.dtype | None = None,
    ) -> None:
        """Print the Keras-style table and Total/Trainable/Non-trainable lines.

        ``depth=None`` shows every level; ``leaves=True`` lists the leaf layers with
        their index (what ``fl.select.first/last/between`` count);
        ``input_shape=(3, 224, 224)`` adds output shapes, from a zero example of
        ``input_dtype`` (default: ``torch.long`` when the first weighted layer is an
        Embedding, else the parameters' dtype). Every table adds up to its Total line:
        weights a module owns beside its children get rows of their own, and a tensor
        shared by several rows (tied embeddings) is counted in the first and noted in
        the others.

        >>> import frostline as fl
        >>> fl.wrap(nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 2))).summary(input_shape=(5,))
        ... # doctest: +ELLIPSIS
        Model: "sequential"
        ...
        """
        print_summary(
            self.summary_text(
                depth=depth,
                expand_nested=expand_nested,
                leaves=leaves,
                input_shape=input_shape,
                input_dtype=input_dtype,
                line_length=line_length,
            ),
            print_fn,
        )

    def summary_text(self, **kwargs) -> str:
        """What :meth:`summary` prints, as a string."""
        return render(
            self, optimizer_line=self._optimizer_line(), savings_line=self._savings_line(), **kwargs
        )

    def _optimizer_line(self) -> str | None:
        if self._live is None or self._live.optimizer is None:
            return None
        n = self._live.state_numel()
        return f"Optimizer params: {n:,} ({format_size(self._live.state_bytes())})"

    def _savings_line(self) -> str | None:

        c = counts(self._module)
        if not c.frozen_param_bytes:
            return None
        spec = self._config.optimizer if self._config is not None else None
        slots = spec.slots if spec is not None else 0
        grads = c.frozen_param_bytes
        state = c.frozen_param_bytes * slots
        what = (
            f" + {type(spec).__name__} state {format_size(state)}"
            if spec is not None and slots
            else ""
        )
        return f"Memory saved by freezing: {format_size(grads + state)} (gradients {format_size(grads)}{what})"

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Weights (safetensors) plus metadata: how to rebuild, trainable state, BatchNorm policy."""
        saving.save_model(self, path)

    def save_weights(self, path: str | os.PathLike) -> None:
        """The weights alone (safetensors, atomically), as Keras's ``save_weights``: no
        architecture or trainable state; read back with :meth:`load_weights`."""
        saving.save_weights(self, path)

    def load_weights(self, path: str | os.PathLike, *, strict: bool = True) -> None:
        """Load weights (and trainable state) saved by :meth:`save`; a mismatch lists the keys."""
        saving.load_weights(self, path, strict=strict)

    def export(
        self,
        path: str | os.PathLike,
        format: str = "onnx",
        *,
        example=None,
        input_shape: Sequence[int] | None = None,
        input_dtype: torch.dtype | None = None,
        dynamic_batch: bool = True,
    ) -> Path:
        """Export for inference: ``format="onnx"`` (``.onnx``) or ``"torch"`` (a ``torch.export``
        program, ``.pt2``). LoRA is merged, BatchNorm after a conv folded, eval mode, on a copy;
        the export is checked against the model before it is written (atomically). Give
        ``example`` (a batch) or ``input_shape`` (one sample). See :func:`frostline.api.export.export`.

        >>> import tempfile, torch, frostline as fl
        >>> m = fl.Sequential([nn.Linear(4, 2)])
        >>> m.export(tempfile.mkdtemp() + "/m.pt2", format="torch", input_shape=(4,)).suffix
        '.pt2'
        """
        return export_model(
            self,
            path,
            format,
            example=example,
            input_shape=input_shape,
            input_dtype=input_dtype,
            dynamic_batch=dynamic_batch,
        )


def _valid_name(name: str) -> str:
    cleaned = re.sub(r"[.\s]", "_", name) or "layer"
    return cleaned


class Sequential(Model):
    """A stack of torch modules and frostline Models; a nested Model is one layer.

    >>> import frostline as fl
    >>> base = fl.wrap(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), name="base")
    >>> model = fl.Sequential([base, nn.Linear(4, 2)])
    >>> [layer.name for layer in model.layers]
    ['base', 'linear']
    >>> model.layers[0] is base
    True
    """

    def __init__(
        self,
        layers: Iterable[nn.Module | Layer] | None = None,
        name: str | None = None,
        *,
        trainable: bool | None = None,
    ) -> None:
        super().__init__(SequentialModule(), name=name or "sequential")
        if layers is not None and isinstance(layers, nn.Module | Layer):
            raise TypeError("Sequential takes a list of layers: fl.Sequential([m1, m2, ...])")
        for layer in layers or []:
            self.add(layer)
        if trainable is not None:
            self.trainable = trainable

    def add(self, layer: nn.Module | Layer) -> None:
        """Append a torch module or a frostline Model/Layer."""
        if isinstance(layer, Layer):
            module, name = layer.module, layer.name
            if isinstance(layer, Model):
                set_view(module, layer)
        elif isinstance(layer, nn.Module):
            module, name = layer, snake_case(type(layer).__name__)
        else:
            raise TypeError(
                f"Sequential layers must be torch.nn.Module or frostline layers, got {type(layer).__name__}"
            )
        base = _valid_name(name)
        existing = set(dict(self._module.named_children()))
        unique, i = base, 1
        while unique in existing:
            unique = f"{base}_{i}"
            i += 1
        self._module.add_module(unique, module)
        batchnorm.install_all(module)
        self._children = None

    def pop(self) -> Layer:
        """Remove and return the last layer."""
        names = list(dict(self._module.named_children()))
        if not names:
            raise IndexError("pop from an empty Sequential")
        layer = self.layers[-1]
        delattr(self._module, names[-1])
        self._children = None
        return layer


def wrap(module: nn.Module, name: str | None = None) -> Model:
    """Wrap any ``torch.nn.Module`` as a frostline :class:`Model` (never a copy).

    >>> import frostline as fl
    >>> model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> model.count_params()
    58
    """
    if isinstance(module, Layer):
        module = module.module
    return Model(module, name=name)
