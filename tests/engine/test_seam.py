"""The trainer drives the frozen-part engine through one narrow typed seam
(frostline.engine.runner.seam.FrozenPartSeam), never through the runner's internals."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import torch
from torch import nn

import frostline as fl
from frostline.engine import trainer as trainer_mod
from frostline.engine.runner import Runner
from frostline.engine.runner.seam import SEAM, FrozenPartSeam

TRAINER = Path(inspect.getfile(trainer_mod))


def runner_accesses(source: str) -> dict[str, list[int]]:
    """Every attribute read or written on the trainer's runner in ``source``: on
    ``self.runner`` and on a local named ``runner`` (name -> line numbers)."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        obj = node.value
        on_local = isinstance(obj, ast.Name) and obj.id == "runner"
        on_self = (
            isinstance(obj, ast.Attribute)
            and obj.attr == "runner"
            and isinstance(obj.value, ast.Name)
            and obj.value.id == "self"
        )
        if on_local or on_self:
            found.setdefault(node.attr, []).append(node.lineno)
    return found


def test_the_check_sees_what_a_trainer_touches():
    source = "def f(self, runner):\n    runner.status['x'] = 1\n    return self.runner.suffix\n"
    assert runner_accesses(source) == {"status": [2], "suffix": [3]}


def test_the_trainer_uses_only_the_seam():
    used = runner_accesses(TRAINER.read_text())
    outside = {name: lines for name, lines in used.items() if name not in SEAM}
    assert not outside, f"engine/trainer.py uses runner members outside the seam: {outside}"
    assert {"begin_fit", "begin_epoch", "prepare_data", "batch_inputs", "sync"} <= set(used)


def test_the_trainer_never_writes_the_runner_status():
    tree = ast.parse(TRAINER.read_text())
    writes = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "status"
    ]
    assert writes == []


def test_the_seam_is_narrow_and_the_runner_has_all_of_it():
    assert "part" not in SEAM and "suffix" not in SEAM and "steps" not in SEAM
    assert len(SEAM) <= 17
    runner = Runner(nn.Linear(2, 2))
    missing = [name for name in SEAM if not hasattr(runner, name)]
    assert missing == []
    # the Runner's signatures match the Protocol's (mypy checks the types)
    for name in SEAM:
        want = getattr(FrozenPartSeam, name)
        if isinstance(want, property):
            continue
        got = inspect.signature(getattr(Runner, name)).parameters
        assert list(got) == list(inspect.signature(want).parameters), name


def test_a_fit_through_the_seam_caches_and_logs_as_before():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    model = fl.wrap(net)
    model.layers[0].trainable = False
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
    y = np.zeros((32, 3), np.float32)
    notes: list[str] = []

    class Notes(fl.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            notes.append(self.params["epoch_note"])

    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[Notes()])
    assert notes[0].startswith("cache: built (32 samples after")
    assert notes[1].startswith("cache: reused (32 samples after")
    assert model.cache_status["train"].cached
