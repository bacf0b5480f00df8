"""Checkpoint writer that tests/io/test_checkpoint_store.py kills with SIGKILL.

``python tests/io/_crash_writer.py write <seed> <directory>`` is one writer: it prints
``ready`` once imported, resumes from ``CheckpointManager.latest()`` and saves ~1 MB
checkpoints back to back until it is killed.

``python tests/io/_crash_writer.py serve`` imports frostline/torch once, prints ``ready``,
then reads commands from stdin:

* ``start <seed> <directory>`` forks a fresh writer process and prints ``pid <pid>``.
  The writer resumes from ``CheckpointManager.latest()`` and saves checkpoints of
  ~1 MB back to back until it is killed. With probability 1/3 it first re-saves the
  latest epoch (atomic replacement of an existing checkpoint directory), and half of
  the writers disable ``renameat2`` so the rename-aside fallback is exercised too.
* ``reap <pid>`` waits for that writer and prints ``status <raw wait status>``.
* ``quit`` exits.

Forking from a warm server keeps each restart in milliseconds instead of the ~2 s a
cold ``import torch`` costs, so the test can afford many kills; every writer is still
a separate process killed with a real SIGKILL.
"""

from __future__ import annotations

import math
import os
import random
import sys
import traceback
from pathlib import Path

try:
    import frostline.io.checkpoint  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import numpy as np
import torch

import frostline.io.atomic
from frostline.io.checkpoint import CheckpointManager

KEEP_LAST = 2
N = 128 * 1024  # float32 elements per big tensor: 2 x 512 KiB ~ 1 MB per checkpoint


def loss_for(epoch: int) -> float:
    """Deterministic, non-monotonic validation loss (NaN now and then)."""
    if epoch % 11 == 5:
        return math.nan
    return ((epoch * 7919) % 101) / 101.0


def tensors_for(epoch: int) -> dict[str, dict[str, torch.Tensor]]:
    """Content determined by the epoch, so a reader can check what it loaded."""
    # numpy builds these in microseconds, without waking torch's intra-op thread pool
    return {
        "model": {
            "w": torch.from_numpy(np.full(N, epoch, dtype=np.float32)),
            "b": torch.from_numpy(np.arange(1000, dtype=np.int64) + epoch),
        },
        "optimizer": {"m": torch.from_numpy(np.full(N, -epoch, dtype=np.float32))},
    }


def write_forever(directory: str, seed: int) -> None:
    rng = random.Random(seed)
    if rng.random() < 0.5:
        frostline.io.atomic._exchange = lambda a, b: False  # force the portable fallback
    mgr = CheckpointManager(directory, keep_last=KEEP_LAST, keep_best=True)
    latest = mgr.latest()
    epoch = -1 if latest is None else mgr.load(latest).epoch
    if latest is not None and rng.random() < 1 / 3:
        mgr.save(epoch, tensors_for(epoch), {"epoch": epoch}, {"val_loss": loss_for(epoch)})
    while True:
        epoch += 1
        mgr.save(epoch, tensors_for(epoch), {"epoch": epoch}, {"val_loss": loss_for(epoch)})


def serve() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "start":
            pid = os.fork()
            if pid == 0:  # writer child
                try:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    write_forever(args[1], int(args[0]))
                except BaseException:
                    traceback.print_exc()
                    sys.stderr.flush()
                    os._exit(1)
                os._exit(0)
            print(f"pid {pid}", flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            print(f"status {status}", flush=True)
        elif cmd == "quit":
            return


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 2:
        serve()
    elif sys.argv[1:2] == ["write"] and len(sys.argv) == 4:
        print("ready", flush=True)  # imports done: from now on it only writes
        write_forever(sys.argv[3], int(sys.argv[2]))
    else:
        sys.exit("usage: python _crash_writer.py serve | write <seed> <directory>")
