"""A frostline training job for torchrun (used by tests/test_distributed.py).

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/fit_job.py --out DIR --mode two_phase

Modes:
  two_phase       phase 1 (base frozen, head trains, activations cached), then phase 2
                  with gradual unfreezing (block 2 at epoch 2, block 1 at epoch 4) and a
                  mid-epoch freeze (the head's first Linear frozen at epoch 3 batch 3,
                  unfrozen at epoch 5). Block 0 (Linear, SyncBatchNorm, ReLU) stays frozen
                  throughout: its SyncBatchNorm runs in train mode with a process group
                  initialised, on the CPU, which only works because a frozen BatchNorm
                  runs in inference mode. (torch's DDP refuses SyncBatchNorm inside a CPU
                  module, so on the CPU it must stay in the frozen prefix.)
                  Then one more epoch from a DataLoader with a DistributedSampler.
                  Writes DIR/rank{R}.json and DIR/rank{R}.pt.
  crash_raise     rank 1 raises at the start of epoch 1 (the others are in a collective).
  crash_exit      rank 1 dies (os._exit(7)) in the middle of epoch 1.
  mismatch        rank 1 builds a different model (block 1 is wider).
  one_rank_unfreeze  a callback unfreezes block 2 on rank 1 only, at epoch 1.

The same code runs single-process (``run_two_phase(out, batch_size=2 * b)``) for the
reference result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import frostline as fl
from frostline.engine import distributed

N_TRAIN, N_VAL, FEATURES, CLASSES = 96, 32, 8, 3


def build_model(rank: int = 0, *, wide: bool = False) -> fl.Model:
    # ranks start from different weights on purpose: fit must broadcast rank 0's
    torch.manual_seed(0 if rank == 0 else 1000 + rank)
    hidden = 17 if wide else 16
    block0 = nn.Sequential(nn.Linear(FEATURES, 16), nn.SyncBatchNorm(16), nn.ReLU())
    block1 = nn.Sequential(nn.Linear(16, hidden), nn.ReLU())
    block2 = nn.Sequential(nn.Linear(hidden, 16), nn.ReLU())
    base = fl.wrap(nn.Sequential(block0, block1, block2), name="base")
    head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    with torch.no_grad():  # non-trivial statistics and affine, so a moved one would show
        bn = block0[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return fl.Sequential([base, fl.wrap(head, name="head")], name="net")


def make_data():
    rng = np.random.RandomState(123)
    x = rng.randn(N_TRAIN + N_VAL, FEATURES).astype("float32")
    w = rng.randn(FEATURES, CLASSES).astype("float32")
    y = (x @ w).argmax(1)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(
        t.detach().cpu().contiguous().numpy().tobytes(), digest_size=12
    ).hexdigest()


def state_digest(model: fl.Model) -> str:
    sd = model.module.state_dict()
    return digest(torch.cat([sd[k].detach().double().reshape(-1) for k in sorted(sd)]))


def frozen_parts(model: fl.Model) -> dict[str, str]:
    """Digests of what stays frozen: block 0 (its SyncBatchNorm's statistics included)."""
    return frozen_of(model.module.state_dict())


def frozen_of(state_dict) -> dict[str, str]:
    return {k: digest(v) for k, v in state_dict.items() if k.startswith("base.0.")}


class Recorder(fl.Callback):
    """Per epoch: the cache status of the train role and what the trainable part is wrapped in."""

    def __init__(self) -> None:
        self.cache: list[str] = []
        self.wrapped: list[str] = []

    def on_epoch_end(self, epoch, logs=None):
        trainer = self.model._trainer
        self.cache.append(str(trainer.runner.status.get("train", "")))
        w = trainer._wrapped
        self.wrapped.append(
            f"{type(w).__name__}(find_unused_parameters={getattr(w, 'find_unused_parameters', None)})"
        )


class MidEpochToggle(fl.Callback):
    """Freeze the head's first Linear in the middle of epoch 3; unfreeze it when epoch 5 begins."""

    def __init__(self) -> None:
        self.epoch = -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if epoch == 5:
            self.model.get_layer("head").layers[0].trainable = True

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == 3 and batch == 3:
            self.model.get_layer("head").layers[0].trainable = False


def gradual(base):
    try:
        from frostline.workflows.schedules import GradualUnfreezing
    except ImportError:  # fallback: one more block from the top every 2 epochs from epoch 2

        class GradualUnfreezing(fl.Callback):
            def __init__(self, base, start_epoch, every):
                self.base, self.start, self.every = base, start_epoch, every

            def on_epoch_begin(self, epoch, logs=None):
                if epoch >= self.start and (epoch - self.start) % self.every == 0:
                    k = (epoch - self.start) // self.every + 1
                    blocks = self.base.layers
                    if k <= len(blocks):
                        blocks[len(blocks) - k].trainable = True

    return GradualUnfreezing(base, start_epoch=2, every=2)


def run_two_phase(out: Path, batch_size: int, rank: int = 0, world: int = 1) -> dict:
    (x, y), val = make_data()
    model = build_model(rank)
    base = model.get_layer("base")
    base.trainable = False
    model.compile(
        optimizer=fl.optimizers.SGD(0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        device="cpu",
    )
    rec = Recorder()
    h1 = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=2,
        shuffle=False,
        validation_data=val,
        verbose=2,
        seed=0,
        callbacks=[rec],
    )
    after1 = frozen_parts(model)
    h2 = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=6,
        initial_epoch=2,
        shuffle=False,
        validation_data=val,
        verbose=2,
        seed=0,
        callbacks=[gradual(base), MidEpochToggle(), rec],
    )
    # phase 3: one more epoch from the user's DataLoader (a DistributedSampler under torchrun)
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    sampler = DistributedSampler(ds, shuffle=False) if world > 1 else None
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler)
    h3 = model.fit(loader, epochs=7, initial_epoch=6, validation_data=val, verbose=2, seed=0)
    bn = base.module[0][1]
    result = {
        "rank": rank,
        "world": world,
        "history1": {k: v for k, v in h1.history.items() if k != "epoch_time"},
        "history2": {k: v for k, v in h2.history.items() if k != "epoch_time"},
        "epoch_time2": h2.history.get("epoch_time"),
        "history3": {k: v for k, v in h3.history.items() if k != "epoch_time"},
        "sampler_epoch": sampler.epoch if sampler is not None else None,
        "state": state_digest(model),
        "frozen_after_phase1": after1,
        "frozen_final": frozen_parts(model),
        "syncbn_batches_tracked": int(bn.num_batches_tracked),
        "trainable_final": [n for n, p in model.module.named_parameters() if p.requires_grad],
        "cache": rec.cache,
        "wrapped": rec.wrapped,
        "verification_ok": bool(model.last_verification is None or model.last_verification.ok),
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.module.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    return result


def initial_state(out: Path) -> None:
    """Rank 0's initial weights (what every rank must start from)."""
    torch.save(build_model(0).module.state_dict(), out / "initial.pt")


def mark(out: Path, name: str) -> None:
    """Record when something happened (the test measures how long the job lived after it)."""
    (out / name).write_text(repr(time.time()))


class Crash(fl.Callback):
    def __init__(self, how: str, out: Path) -> None:
        self.how, self.out, self.epoch = how, out, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.how == "raise" and epoch == 1 and distributed.rank() == 1:
            mark(self.out, "failed_at")
            raise RuntimeError("injected failure on rank 1 at epoch 1")

    def on_train_batch_begin(self, batch, logs=None):
        if self.how == "exit" and self.epoch == 1 and batch == 2 and distributed.rank() == 1:
            print("rank 1: exiting hard (os._exit(7))", flush=True, file=sys.stderr)
            mark(self.out, "failed_at")
            os._exit(7)


class UnfreezeOnOneRank(fl.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and distributed.rank() == 1:
            self.model.get_layer("base").module[2].requires_grad_(True)


def run_failure(mode: str, rank: int, out: Path) -> None:
    (x, y), val = make_data()
    model = build_model(rank, wide=(mode == "mismatch" and rank == 1))
    model.get_layer("base").trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", device="cpu")
    cbs = {
        "crash_raise": [Crash("raise", out)],
        "crash_exit": [Crash("exit", out)],
        "one_rank_unfreeze": [UnfreezeOnOneRank()],
    }.get(mode, [])
    out.mkdir(parents=True, exist_ok=True)
    mark(out, f"fit_started_rank{rank}")
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=cbs)
    print(f"rank {rank}: finished", flush=True)


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="two_phase")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    @record  # torchrun's summary then shows the failing rank's traceback
    def job() -> None:
        torch.set_num_threads(1)
        rank, world = distributed.rank(), distributed.world_size()
        try:
            if args.mode == "two_phase":
                if rank == 0:
                    args.out.mkdir(parents=True, exist_ok=True)
                    initial_state(args.out)
                run_two_phase(args.out, args.batch_size, rank, world)
            else:
                run_failure(args.mode, rank, args.out)
        finally:
            if torch.distributed.is_initialized():
                if args.mode == "two_phase":
                    torch.distributed.barrier()  # both ranks done before either tears down
                torch.distributed.destroy_process_group()

    job()


if __name__ == "__main__":
    main()
