"""The training loop behind ``Model.fit``, ``evaluate`` and ``predict``.

data -> batches -> step (frozen prefix, trainable suffix, loss, backward) ->
live optimizer -> callbacks. Before every step the optimizer, the prefix boundary
and the DDP wrapper are brought in line with the trainable set, so a change of
``trainable`` anywhere (between fits, or in a callback mid-epoch) takes effect at
the very next step.
"""

from __future__ import annotations

import contextlib
import math
import random
import time

import numpy as np
import torch
from torch import nn

from frostline.core import batchnorm
from frostline.core.checks import require_int
from frostline.engine import data as data_mod
from frostline.engine import distributed, rng
from frostline.engine.callbacks import BackupCallback, CallbackList, History
from frostline.engine.fit_options import FitOptions
from frostline.engine.frozen import call_model
from frostline.engine.progress import ProgressLogger, resolve_verbose
from frostline.engine.protocols import CompileSettings, TrainableModel
from frostline.engine.runner import CacheOptions, CacheStatus, Runner, WholeModel, fingerprint_of
from frostline.engine.runner.seam import FrozenPartSeam
from frostline.engine.tracking import named_parameters_once
from frostline.engine.training_state import CheckpointWriter, restore
from frostline.engine.verify import FrozenWeightsChanged, fingerprint


class TrainingError(RuntimeError):
    """Training cannot go on (nothing trainable, NaN loss, ...)."""


def _autocast(device: torch.device, precision: str | None):
    if precision in (None, "32", "fp32", "float32"):
        return contextlib.nullcontext()
    dtype = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to(obj, device):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj.to(device, non_blocking=True) if isinstance(obj, torch.Tensor) else obj


def _head(x, n: int):
    """The first ``n`` samples of a batch (a tensor, or a dict/tuple of tensors)."""
    if isinstance(x, dict):
        return {k: _head(v, n) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_head(v, n) for v in x)
    return x[:n]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def explain_input_error(module: nn.Module, x: torch.Tensor, err: Exception) -> Exception:
    """Turn a shape/dtype failure of the first layer into a message naming the layer."""
    first = next(
        ((n, m) for n, m in module.named_modules() if list(m.parameters(recurse=False))), None
    )
    if first is None or not isinstance(x, torch.Tensor):
        return err
    name, m = first
    # the batch axis as Keras writes it: the tensor here may be a probe slice or one batch
    shape = (None, *x.shape[1:]) if x.dim() else tuple(x.shape)
    expected = None
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        dims = (
            {nn.Conv1d: "L", nn.Conv2d: "H, W", nn.Conv3d: "D, H, W"}[type(m)]
            if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            else "..."
        )
        if x.dim() < 2 or x.shape[1] != m.in_channels:
            expected = f"(batch, {m.in_channels}, {dims}) with {m.in_channels} input channels"
            if x.dim() == 4 and x.shape[-1] == m.in_channels:
                expected += "; your images look channels-last (NHWC): pass x.transpose(0, 3, 1, 2)"
    elif isinstance(m, nn.Linear) and (x.dim() < 1 or x.shape[-1] != m.in_features):
        expected = f"(batch, ..., {m.in_features}) with {m.in_features} features in the last axis"
    elif isinstance(m, nn.Embedding) and x.is_floating_point():
        expected = f"integer token ids in [0, {m.num_embeddings - 1}] (got dtype {x.dtype})"
    if expected is None:
        return err
    return data_mod.DataError(
        f"input x has shape {shape}, but the first layer {name!r} ({type(m).__name__}) expects {expected}"
    )


class Trainer:
    """Runs fit/evaluate/predict for one Model (kept on the model between calls)."""

    def __init__(self, model: TrainableModel) -> None:
        self.model = model
        #: the frozen-part engine, used through its narrow seam only
        self.runner: FrozenPartSeam | None = None
        self.ctx = distributed.DistContext()
        self._wrapped: nn.Module | None = None
        self._wrapped_key: tuple | None = None
        self._runner_spec: tuple | None = None
        self._checked_input = False
        #: the module's parameters, read once per epoch during fit (None: read at each use)
        self._named: list[tuple[str, nn.Parameter]] | None = None
        #: (epoch, batches done, running sums) when resuming inside an epoch
        self._mid_epoch: tuple[int, int, dict] | None = None

    # -- set-up ----------------------------------------------------------------------
    def _config(self) -> CompileSettings:
        cfg = self.model.compile_config
        if cfg is None:
            raise TrainingError("call model.compile(optimizer=..., loss=...) before fit()")
        return cfg

    def _runner(self, options: CacheOptions | None = None) -> FrozenPartSeam:
        """The runner, new when the model's structure (layers added/removed/replaced) or the
        cache options changed; ``options=None`` keeps the current options."""
        module = self.model.module
        structure = tuple(id(m) for m in module.modules())
        runner = self.runner
        if runner is None or not runner.matches(module, options) or self._runner_spec != structure:
            if options is None:
                options = runner.options if runner is not None else CacheOptions()
            if runner is not None:
                runner.close()
            runner = self.runner = Runner(module, options)
            self._runner_spec = structure
        return runner

    def _seam(self) -> FrozenPartSeam:
        """The runner of the current fit/evaluate (set up by :meth:`_runner`)."""
        assert self.runner is not None
        return self.runner

    def _suffix(self, device: torch.device) -> nn.Module:
        """The trainable part, DDP-wrapped when distributed (rebuilt when it changes)."""
        part = self._seam().trainable_part()
        key = (id(part.module), part.ids)
        distributed.same_trainable(part.ids, self.ctx)
        if self._wrapped is None or key != self._wrapped_key:
            self._wrapped = distributed.wrap_trainable(
                part.module,
                self.ctx,
                device,
                find_unused_parameters=self._config().find_unused_parameters,
            )
            self._wrapped_key = key
        return self._wrapped

    def _sync(self) -> bool:
        """Optimizer + prefix boundary in line with the trainable set; True if it changed."""
        live = self.model.live_optimizer
        assert live is not None
        try:
            changed = live.sync(self._named)
        except RuntimeError as e:
            raise TrainingError(str(e)) from None
        # its steps are counted (scoped to this optimizer, removed at fit end)
        moved = self._seam().sync(live.optimizer)
        if changed or moved:
            self._note_trainable(live.module)
        return changed or moved

    def _note_trainable(self, module: nn.Module) -> None:
        """Remember what trained during this fit: verification exempts it (gradual unfreezing)."""
        for p in module.parameters():
            if p.requires_grad:
                self._ever_trainable.add(id(p))
        for m in module.modules():
            if batchnorm.is_batchnorm(m) and not batchnorm.runs_inference(m):
                self._ever_trainable.update(id(b) for b in m.buffers(recurse=False))

    # -- fit ---------------------------------------------------------------------------
    def fit(self, x=None, y=None, options: FitOptions | None = None) -> History:
        """Train on ``x``/``y`` as :class:`FitOptions` say; returns the History."""
        o = options if options is not None else FitOptions()
        model = self.model
        train_it, val_it = self._fit_data(x, y, o)
        runner = self._fit_runner(o)
        cblist, history = self._fit_callbacks(o)
        resume = o.resume if o.resume is not None else self._saves.backup
        initial_epoch = (
            self._resume(resume, train_it, cblist) if resume is not None else o.initial_epoch
        )
        # one read of the frozen weights serves the verification and the cache key
        frozen_before = fingerprint(model, digest=runner.weight_digest) if o.verify_frozen else None
        self._sync()
        self._note_trainable(model.module)
        try:
            logs: dict = {}
            cblist.on_train_begin(logs)
            for epoch in range(initial_epoch, o.epochs):
                if model.stop_training:
                    break
                logs = self._run_epoch(epoch, o, train_it, val_it, cblist, logs)
            if o.epochs > 0 and model.live_optimizer is not None:
                model.live_optimizer.finalize_variable_values()  # Keras: before on_train_end
            cblist.on_train_end(logs)
            distributed.barrier(self.ctx)  # ranks leave fit together: no collective left in flight
        finally:
            runner.end_fit()  # what fit set up (step hooks, flipped modes) goes away
            self._named = None
        if frozen_before is not None:
            report = frozen_before.check(model, exempt=self._ever_trainable)
            model.last_verification = report
            if not report.ok:
                raise FrozenWeightsChanged(str(report))
        return history

    def _fit_callbacks(self, o: FitOptions) -> tuple[CallbackList, History]:
        """The callbacks of this fit (History first, progress last) and where it checkpoints."""
        model = self.model
        verbose = resolve_verbose(o.verbose)
        history = History()
        cbs = list(o.callbacks or [])
        progress = [ProgressLogger(verbose)] if verbose and self.ctx.is_main else []
        cblist = CallbackList([history, *cbs, *progress], model)
        self._params: dict = {"epochs": o.epochs, "steps": None, "verbose": verbose}
        cblist.set_params(dict(self._params))
        model.stop_training = False
        model.history = history
        self._saves, self._mid_epoch = _Checkpoints(o, cbs), None
        self._stop_on_nan = any(cb.stops_on_nan for cb in cbs) or o.on_nan == "stop"
        self._rehash = any(cb.writes_weights for cb in cbs)
        return cblist, history

    def _run_epoch(
        self, epoch: int, o: FitOptions, train_it, val_it, cblist, last_logs: dict
    ) -> dict:
        """One epoch: train steps, validation when due, callbacks, schedule, checkpoints;
        returns its logs (``on_epoch_begin`` gets the last epoch's, as it always has)."""
        model, runner = self.model, self._seam()
        t0 = time.perf_counter()  # the epoch's time counts all it does (cache build too)
        model.module.train()
        # frozen weights are re-hashed only when code that may write them ran
        runner.begin_epoch(reread_weights=self._rehash)
        self._named = named_parameters_once(model.module)  # the structure, once per epoch
        cblist.on_epoch_begin(epoch, last_logs)
        self._sync()
        logs, notes = self._train_epoch(train_it, epoch, cblist, self._stop_on_nan)
        if val_it is not None and _should_validate(epoch, o.validation_freq):
            val_logs = self._evaluate_data(val_it, "val")
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        logs["epoch_time"] = time.perf_counter() - t0
        logs = distributed.same_logs(logs, self.ctx)
        self._params["epoch_note"] = notes
        cblist.set_params(dict(self._params))
        cblist.on_epoch_end(epoch, logs)
        if model.live_optimizer is not None and self._config().scheduler_interval == "epoch":
            model.live_optimizer.scheduler_step()
        self._checkpoint(epoch, None, logs, cblist, train_it.seed)
        distributed.end_epoch(model, self.ctx)
        return logs

    def _fit_data(self, x, y, o: FitOptions):
        """The epoch iterators of the training and validation data (device and seeds set)."""
        model, cfg = self.model, self._config()
        batch_size = data_mod.check_batch_size(o.batch_size)
        x_val, sw = o.validation_data, o.sample_weight
        if o.validation_split and x_val is None:
            (x, y, sw), x_val = data_mod.split_validation(x, y, o.validation_split, sw)
        elif o.validation_split:
            raise data_mod.DataError("pass either validation_split or validation_data, not both")
        outputs = len(cfg.objective.keys)
        if o.class_weight is not None and outputs > 1:
            raise data_mod.DataError(
                f"class_weight is only supported for models with a single output (as in Keras); "
                f"this one has {outputs} losses: pass sample_weight instead"
            )
        train = data_mod.prepare(x, y, sw, outputs=outputs)
        val = data_mod.unpack_validation(x_val, outputs=outputs)
        self.ctx = distributed.detect(cfg.device, module=model.module)
        model.module.to(cfg.device)
        distributed.prepare_module(model.module, self.ctx, cfg.device)
        if o.seed is not None:
            seed_everything(o.seed)
        seed = o.seed if o.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        rank, world = self.ctx.rank, self.ctx.world
        train_it = data_mod.EpochIterator(
            train,
            batch_size,
            shuffle=o.shuffle,
            seed=seed,
            steps_per_epoch=o.steps_per_epoch,
            class_weight=data_mod.check_class_weight(o.class_weight),
            rank=rank,
            world=world,
            on_pass=self._on_pass(train),
            workers=o.workers,
        )
        val_it = None
        if val is not None:
            val_it = data_mod.EpochIterator(
                val,
                data_mod.check_batch_size(o.validation_batch_size or batch_size),
                steps_per_epoch=o.validation_steps,
                rank=rank,
                world=world,
                on_pass=self._on_pass(val),
                workers=o.workers,
            )
        self._fingerprints = {"train": fingerprint_of(train), "val": fingerprint_of(val)}
        return train_it, val_it

    def _on_pass(self, data):
        """What a loader does before each pass (a distributed sampler's epoch)."""
        loader = getattr(data, "loader", None)
        return None if loader is None else lambda n: distributed.prepare_loader(loader, self.ctx, n)

    def _fit_runner(self, o: FitOptions) -> FrozenPartSeam:
        runner = self._runner(o.cache_options)  # the object fit was given
        runner.begin_fit(o.unfreeze_next)
        self._ever_trainable: set[int] = set()
        return runner

    def _resume(self, resume, train_it, cblist) -> int:
        """Restore the newest checkpoint under ``resume``; returns the epoch to start at
        (the one a mid-epoch checkpoint was taken in, its done batches to be skipped)."""
        state = restore(self.model, resume, cblist)
        train_it.seed = state["shuffle_seed"]
        names = set(state.get("ever_trainable_names") or ())
        params = self.model.module.named_parameters()
        self._ever_trainable |= {id(p) for n, p in params if n in names}
        if state.get("batch") is None:
            return state["epoch"] + 1
        self._mid_epoch = (state["epoch"], state["batch"] + 1, state.get("objective") or {})
        return state["epoch"]

    def _checkpoint(self, epoch: int, batch: int | None, logs: dict, cblist, seed: int) -> None:
        """Write the checkpoints due after ``batch`` of ``epoch`` (None: at its end)."""
        writers = self._saves.due(batch)  # every rank counts; the main one writes
        if not writers or not self.ctx.is_main:
            return
        objective = None if batch is None else self._config().objective.state()
        for writer in writers:
            writer.save(
                self.model,
                epoch,
                logs,
                cblist,
                shuffle_seed=seed,
                ever_trainable=self._ever_trainable,
                batch=batch,
                objective=objective,
            )

    def _train_epoch(self, it: data_mod.EpochIterator, epoch: int, cblist, stop_on_nan: bool):
        """One epoch of train steps; returns its logs and the epoch note (the cache)."""
        model, runner, objective = self.model, self._seam(), self._config().objective
        objective.reset()
        skip = 0
        if self._mid_epoch is not None and self._mid_epoch[0] == epoch:
            _, skip, sums = self._mid_epoch  # resumed inside this epoch
            objective.load_state(sums)
        self._mid_epoch = None
        note = self._prepare_cache("train", it, epoch)
        it.prefetch = not (note is not None and note.cached)  # workers read what runs
        self._params.update(steps=it.num_batches, epoch_note="")
        cblist.set_params(dict(self._params))
        for step, batch in enumerate(it.epoch(epoch)):
            if step < skip:
                continue
            cblist.on_train_batch_begin(step, {})
            try:
                batch_logs = self.train_step(batch)
            except _NonFiniteLoss as e:
                if not stop_on_nan:
                    raise TrainingError(
                        f"loss is {e.value} at epoch {epoch + 1}, batch {step + 1}: training stopped (pass on_nan='stop' or use TerminateOnNaN to stop without an error)"
                    ) from None
                model.stop_training = True
                cblist.on_train_batch_end(step, {"loss": e.value})
                break
            cblist.on_train_batch_end(step, batch_logs)
            self._checkpoint(epoch, step, batch_logs, cblist, it.seed)
        logs = self._epoch_logs(objective)
        return logs, f"cache: {runner.epoch_note('train', note)}"

    def _prepare_cache(
        self, role: str, it: data_mod.EpochIterator, epoch: int = 0
    ) -> CacheStatus | None:
        """Random-access data: the model checked on a first batch (training) and the frozen
        part's cache built or reused; returns its status (None for a loader's batches)."""
        runner, cfg = self._seam(), self._config()
        device = cfg.device
        if not it.indexed:
            return None
        if role == "train" and not runner.verified:
            with rng.kept(rng.generators_of(self.model.module)):  # the loop's draws stay
                example = it.example(epoch)
            self._verify(_to(example, device))
        with _autocast(device, cfg.precision):  # one numeric path: built as it would run
            return runner.prepare_data(
                role,
                it.data,
                indices=it.shard() if self.ctx.enabled else None,
                device=device,
                batch_size=max(it.batch_size, 64),
                fingerprint=self._fingerprints.get(role),
                epoch=epoch,
            )

    # -- steps (as keras/src/backend/torch/trainer.py) ---------------------------------
    def train_step(self, batch: data_mod.Batch) -> dict[str, float]:
        """One optimizer step on one batch; returns the epoch's running logs."""
        cfg, live = self._config(), self.model.live_optimizer
        assert live is not None
        self._sync()
        xin, y, sw = self._step_inputs("train", batch)
        with _autocast(cfg.device, cfg.precision):
            out = self._forward(self._suffix(cfg.device), xin)
            loss, parts = cfg.objective(out, y, sw)
        value = distributed.agreed_loss(float(loss.detach()), self.ctx)
        if not math.isfinite(value):
            raise _NonFiniteLoss(value)
        if cfg.scaler is not None:
            cfg.scaler.scale(live.scale_loss(loss)).backward()
            cfg.scaler.step(live.optimizer)
            cfg.scaler.update()
        else:
            live.scale_loss(loss).backward()
            live.step()
        live.zero_grad()
        if cfg.scheduler_interval == "step":
            live.scheduler_step()
        cfg.objective.update(out, y, value, parts, data_mod.batch_len(xin[0]), sw)
        return cfg.objective.results()

    def test_step(self, batch: data_mod.Batch, role: str) -> None:
        """Loss and metrics of one batch, added to the objective's running sums."""
        cfg = self._config()
        xin, y, sw = self._step_inputs(role, batch)
        with _autocast(cfg.device, cfg.precision):
            out = self._forward(self._seam().trainable_part().module, xin)
        loss, parts = cfg.objective(out, y, sw)
        cfg.objective.update(out, y, float(loss), parts, data_mod.batch_len(xin[0]), sw)

    def predict_step(self, batch: data_mod.Batch, whole: nn.Module, device: torch.device):
        """The whole model's outputs on one batch."""
        return self._forward(whole, (_to(batch.x, device),))

    def _step_inputs(self, role: str, batch: data_mod.Batch):
        """Inputs at the prefix boundary (from the cache when it can serve them) and targets."""
        runner, cfg = self._seam(), self._config()
        device = cfg.device

        def load():  # the raw batch, when the cache cannot serve it
            x = _to(batch.x, device)
            if role == "train" and not runner.verified:
                self._verify(x)
            return x

        xin = runner.batch_inputs(
            role,
            batch.idx,
            load,
            device=device,
            autocast=lambda: _autocast(device, cfg.precision),
        )
        y, sw = batch.labels()
        return xin, _to(y, device), _to(sw, device)

    def _epoch_logs(self, objective) -> dict[str, float]:
        """The epoch's loss and metrics, averaged over all ranks when distributed."""
        if not self.ctx.enabled:
            return objective.results()
        logs = distributed.reduce_sums(objective.state(), self.ctx)
        logs.update({k: v for k, v in objective.results().items() if k not in logs})
        return logs

    def _verify(self, x: torch.Tensor) -> None:
        runner = self._seam()
        module = self.model.module
        if not self._checked_input:  # bad inputs get the clear error before any tracing
            self._checked_input = True
            modes = {m: m.training for m in module.modules()}
            try:
                module.eval()
                with torch.no_grad(), rng.kept(rng.generators_of(module)):
                    call_model(module, _head(x, 1))
            except (RuntimeError, TypeError, ValueError) as e:
                raise explain_input_error(module, x, e) from e
            finally:
                for m, t in modes.items():
                    m.training = t
        runner.verify(x)  # a model that cannot be traced runs whole, never raises

    def _forward(self, module: nn.Module, xin: tuple):
        """``module(*xin)``: the trainable part on the frozen part's outputs (or the raw batch)."""
        try:
            return module(*xin)
        except (RuntimeError, TypeError) as e:
            if self.runner is not None and self.runner.has_frozen_part:
                raise  # the trainable part on frontier tensors: not a raw-input problem
            raise explain_input_error(self.model.module, xin[0], e) from e

    # -- evaluate / predict ------------------------------------------------------------
    def _evaluate_data(self, it: data_mod.EpochIterator, role: str) -> dict[str, float]:
        module, runner = self.model.module, self._seam()
        was_training = module.training
        module.eval()
        runner.sync()  # the eval-mode trace (Python bools such as self.training differ)
        self._config().objective.reset()
        try:
            with torch.no_grad():
                note = self._prepare_cache(role, it)
                it.prefetch = not (note is not None and note.cached)
                it.reset()
                for batch in it.epoch(0):
                    self.test_step(batch, role)
        finally:
            module.train(was_training)
            runner.sync()
        return self._epoch_logs(self._config().objective)

    def evaluate(
        self,
        x=None,
        y=None,
        *,
        batch_size=None,
        verbose="auto",
        sample_weight=None,
        steps=None,
        return_dict=False,
        callbacks=None,
    ):
        model = self.model
        if model.compile_config is None:
            raise TrainingError("call model.compile(optimizer=..., loss=...) before evaluate()")
        batch_size = data_mod.check_batch_size(batch_size)
        if steps is not None:
            require_int("steps", steps, minimum=1)
        outputs = len(model.compile_config.objective.keys)
        data = data_mod.prepare(x, y, sample_weight, outputs=outputs)
        model.module.to(model.compile_config.device)
        self._runner().begin_evaluate()
        cbl = CallbackList(callbacks, model)
        cbl.on_test_begin({})
        self._fingerprints = {"evaluate": fingerprint_of(data)}
        it = data_mod.EpochIterator(
            data, batch_size, steps_per_epoch=steps, rank=self.ctx.rank, world=self.ctx.world
        )
        logs = self._evaluate_data(it, "evaluate")
        cbl.on_test_end(logs)
        if resolve_verbose(verbose) and self.ctx.is_main:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()))
        if return_dict:
            return logs
        return logs["loss"] if len(logs) == 1 else list(logs.values())

    def predict(self, x, *, batch_size=None, verbose=0, steps=None, callbacks=None):
        model = self.model
        batch_size = data_mod.check_batch_size(batch_size)
        if steps is not None:
            require_int("steps", steps, minimum=1)
        data = data_mod.prepare(x, None)
        device = (
            model.compile_config.device
            if model.compile_config is not None
            else next((p.device for p in model.module.parameters()), torch.device("cpu"))
        )
        precision = model.compile_config.precision if model.compile_config is not None else None
        module = model.module
        whole = WholeModel(module)
        was = module.training
        module.eval()
        cbl = CallbackList(callbacks, model)
        cbl.on_predict_begin({})
        it = data_mod.EpochIterator(data, batch_size, steps_per_epoch=steps)
        try:
            with torch.no_grad(), _autocast(device, precision):
                outs = [self.predict_step(batch, whole, device) for batch in it.epoch(0)]
        finally:
            module.train(was)
        cbl.on_predict_end({})
        return _concat(outs)


def _should_validate(epoch: int, freq) -> bool:
    """Keras's ``validation_freq``: every ``freq``-th epoch, or the (1-based) epochs listed.

    >>> [e for e in range(6) if _should_validate(e, 2)], _should_validate(0, [1, 5])
    ([1, 3, 5], True)
    """
    return (epoch + 1) % freq == 0 if isinstance(freq, int) else epoch + 1 in freq


class _Checkpoints:
    """Where ``fit`` checkpoints: ``checkpoint_dir`` at each epoch's end, and the backup
    directory of a :class:`BackupCallback` where it says (``backup``: that directory
    when it holds a checkpoint to resume from)."""

    def __init__(self, o: FitOptions, callbacks: list) -> None:
        self.targets: list[tuple[CheckpointWriter, BackupCallback | None]] = []
        if o.checkpoint_dir is not None:
            self.targets.append(
                (CheckpointWriter(o.checkpoint_dir, keep_last=o.keep_checkpoints), None)
            )
        backups = [cb for cb in callbacks if isinstance(cb, BackupCallback)]
        if len(backups) > 1:
            raise ValueError(
                f"fit got {len(backups)} backup callbacks ({', '.join(type(cb).__name__ for cb in backups)}); "
                "one run is backed up in one directory: pass one"
            )
        self.backup = None
        for cb in backups:
            writer = CheckpointWriter(cb.backup_dir, keep_last=cb.keep_checkpoints)
            self.targets.append((writer, cb))
            self.backup = cb.backup_dir if writer.latest() is not None else None

    def due(self, batch: int | None) -> list[CheckpointWriter]:
        """The writers to save after training batch ``batch`` (None: at the epoch's end)."""
        return [w for w, cb in self.targets if (cb.save_now(batch) if cb else batch is None)]


class _NonFiniteLoss(Exception):
    def __init__(self, value: float) -> None:
        self.value = value


def _concat(outs):
    first = outs[0]
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outs]) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(_concat([o[i] for o in outs]) for i in range(len(first)))
    return torch.cat([o.float().cpu() for o in outs]).numpy()
