"""SIGKILL a training process at random moments; the newest complete checkpoint always resumes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.io.checkpoint import CheckpointManager, load_checkpoint

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_crash_fit.py")


def test_sigkill_during_fit_never_loses_the_run(tmp_path):
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    last_epoch = -1
    kills = 0
    deadline = time.monotonic() + 60
    while kills < 6 and time.monotonic() < deadline:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(run_dir)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # wait until the process has written at least one new checkpoint, then kill at a random moment
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            latest = CheckpointManager(run_dir).latest() if run_dir.exists() else None
            if latest is not None and load_checkpoint(latest).epoch > last_epoch:
                break
            if proc.poll() is not None:
                pytest.fail(f"trainer exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        ckpt = load_checkpoint(run_dir)  # must always succeed
        assert ckpt.epoch >= last_epoch, "epochs went backwards"
        last_epoch = ckpt.epoch
        leftovers = [
            p.name for p in run_dir.iterdir() if p.name.startswith(".") and "lock" not in p.name
        ]
        assert len(leftovers) <= 2, (
            leftovers
        )  # a temp dir from the killed write at most (cleaned on next save)
    assert kills >= 3
    # and a fresh process resumes from it
    torch.manual_seed(0)
    model = fl.Sequential(
        [nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)]
    )
    model.compile(fl.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((256, 64), dtype=np.float32)
    h = model.fit(
        x, np.arange(256) % 4, epochs=last_epoch + 2, batch_size=64, verbose=0, resume=run_dir
    )
    assert h.epoch[-1] == last_epoch + 1
    assert not model.layers[
        0
    ].module.weight.requires_grad  # trainable state came back from the checkpoint
