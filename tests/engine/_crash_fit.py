"""Trains with checkpoints forever (resuming when it can); tests/engine/test_crash_fit.py SIGKILLs it."""

import sys

import numpy as np
import torch
from torch import nn

import frostline as fl
from frostline.io.checkpoint import CheckpointManager

run_dir = sys.argv[1]
torch.manual_seed(0)
model = fl.Sequential(
    [nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)]
)
model.layers[0].trainable = False
model.compile(fl.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy")
x = np.random.default_rng(0).random((256, 64), dtype=np.float32)
y = np.arange(256) % 4
resume = run_dir if CheckpointManager(run_dir).latest() is not None else None
model.fit(
    x,
    y,
    epochs=10_000,
    batch_size=64,
    verbose=0,
    seed=0,
    checkpoint_dir=run_dir,
    keep_checkpoints=2,
    resume=resume,
)
