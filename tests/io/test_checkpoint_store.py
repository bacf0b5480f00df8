"""Tests for frostline.io.checkpoint, optimizer_state, rng_state: the manager, flattening, crashes."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from frostline.io.checkpoint import (
    Checkpoint,
    CheckpointManager,
    load_checkpoint,
    resolve_checkpoint,
)
from frostline.io.errors import CheckpointError, CheckpointWarning
from frostline.io.optimizer_state import (
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    parameter_names,
)
from frostline.io.rng_state import capture_rng, restore_rng

TESTS = Path(__file__).resolve().parent


def _tensors(epoch: int) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "model": {"w": torch.full((4, 3), float(epoch)), "b": torch.arange(3) + epoch},
        "optimizer": {"state/w/exp_avg": torch.full((4, 3), -float(epoch))},
    }


def _save(mgr: CheckpointManager, epoch: int, **metrics: float) -> Path:
    return mgr.save(epoch, _tensors(epoch), {"epoch": epoch, "tag": [1, "x"]}, metrics)


def _names(paths) -> list[str]:
    return [p.name for p in paths]


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(data)


# ------------------------------------------------------------------ manager basics


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_last": 0}, "keep_last must be an int >= 1, got 0"),
        ({"keep_last": 2.0}, "keep_last must be an int >= 1, got 2.0"),
        ({"keep_last": True}, "keep_last must be an int >= 1, got True"),
        ({"mode": "minimum"}, "mode must be 'min' or 'max', got 'minimum'"),
        ({"monitor": ""}, "monitor must be a non-empty metric name"),
    ],
)
def test_manager_validates_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CheckpointManager(tmp_path, **kwargs)
    with pytest.raises(TypeError, match="keep_best must be a bool"):
        CheckpointManager(tmp_path, keep_best="yes")  # type: ignore[arg-type]


def test_save_and_load_roundtrip(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    path = mgr.save(
        12,
        _tensors(12),
        {"epoch": 12, "betas": (0.9, 0.999), "nested": {"a": None, "b": True}},
        {"val_loss": np.float32(0.25), "acc": 1, "t": torch.tensor(0.5)},
    )
    assert path == tmp_path / "run" / "epoch-00012"
    assert sorted(os.listdir(path)) == [
        "COMPLETE",
        "metrics.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    complete = json.loads((path / "COMPLETE").read_text())
    assert complete["epoch"] == 12
    assert sorted(complete["files"]) == sorted(set(os.listdir(path)) - {"COMPLETE"})
    ckpt = mgr.load()
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.epoch == 12 and ckpt.path == path
    assert ckpt.state == {"epoch": 12, "betas": [0.9, 0.999], "nested": {"a": None, "b": True}}
    assert ckpt.metrics == {"val_loss": 0.25, "acc": 1.0, "t": 0.5}
    assert ckpt.tensors.keys() == {"model", "optimizer"}
    for group, tensors in _tensors(12).items():
        for name, t in tensors.items():
            assert torch.equal(ckpt.tensors[group][name], t)
    assert load_checkpoint(path).epoch == 12 == mgr.load(path).epoch
    # only the lock file besides the checkpoint: no temp leftovers
    assert sorted(os.listdir(tmp_path / "run")) == [".frostline-checkpoints.lock", "epoch-00012"]


def test_save_rejects_bad_input_without_touching_disk(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        mgr.save(-1, {}, {}, {})
    with pytest.raises(ValueError, match="tensor group name '../x'"):
        mgr.save(1, {"../x": {}}, {}, {})
    with pytest.raises(TypeError, match=r"tensors\['model'\]: tensor 'w' is a list"):
        mgr.save(1, {"model": {"w": [1.0]}}, {}, {})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"state\['opt'\]\['x'\] is a object"):
        mgr.save(1, {}, {"opt": {"x": object()}}, {})
    with pytest.raises(TypeError, match="JSON keys must be str"):
        mgr.save(1, {}, {1: "a"}, {})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="metric 'loss' must be a real number, got str"):
        mgr.save(1, {}, {}, {"loss": "low"})  # type: ignore[dict-item]
    assert not (tmp_path / "run").exists()


def test_keeps_last_n_plus_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    losses = [0.5, 0.1, 0.9, math.nan, 0.8, 0.7]
    for epoch, loss in enumerate(losses):
        _save(mgr, epoch, val_loss=loss)
    assert _names(mgr.list()) == ["epoch-00001", "epoch-00004", "epoch-00005"]
    assert mgr.best().name == "epoch-00001"
    assert mgr.latest().name == "epoch-00005"
    # a new best replaces the old best
    _save(mgr, 6, val_loss=0.05)
    assert _names(mgr.list()) == ["epoch-00005", "epoch-00006"]
    assert mgr.best().name == "epoch-00006"


def test_keep_best_mode_max_and_nan_never_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, monitor="acc", mode="max")
    for epoch, acc in enumerate([0.3, 0.6, 0.6, math.nan, math.inf, 0.2]):
        _save(mgr, epoch, acc=acc)
    assert mgr.best().name == "epoch-00001"  # tie: earliest epoch wins; NaN/inf never best
    assert _names(mgr.list()) == ["epoch-00001", "epoch-00005"]


def test_keep_best_false_and_missing_monitor(tmp_path):
    mgr = CheckpointManager(tmp_path / "a", keep_last=2, keep_best=False)
    for epoch, loss in enumerate([0.1, 0.5, 0.6, 0.7]):
        _save(mgr, epoch, val_loss=loss)
    assert _names(mgr.list()) == ["epoch-00002", "epoch-00003"]
    mgr = CheckpointManager(tmp_path / "b", keep_last=2)
    for epoch in range(4):
        _save(mgr, epoch, train_loss=0.1)
    assert _names(mgr.list()) == ["epoch-00002", "epoch-00003"]
    assert mgr.best() is None


def test_resaving_an_epoch_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 3, val_loss=1.0)
    mgr.save(3, {"model": {"w": torch.ones(1)}}, {"v": 2}, {"val_loss": 0.5})
    ckpt = mgr.load()
    assert ckpt.state == {"v": 2} and ckpt.tensors.keys() == {"model"}
    assert _names(mgr.list()) == ["epoch-00003"]


def test_saving_an_older_epoch_never_deletes_it(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=False)
    for epoch in range(5, 8):
        _save(mgr, epoch)
    _save(mgr, 2)  # e.g. a resumed run that restarted from an older checkpoint
    assert _names(mgr.list()) == ["epoch-00002", "epoch-00006", "epoch-00007"]


# ---------------------------------------------------------- corrupted checkpoints


def _three(tmp_path) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for epoch in range(3):
        _save(mgr, epoch, val_loss=1.0 - epoch / 10)
    return mgr


def _fifo(path) -> None:
    path.unlink()
    os.mkfifo(path)


def _latest_with_warnings(mgr: CheckpointManager):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = mgr.latest()
    return latest, [str(w.message) for w in caught if w.category is CheckpointWarning]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "COMPLETE").unlink(), "no COMPLETE marker"),
        (lambda p: _flip_byte(p / "model.safetensors"), "model.safetensors: sha256 mismatch"),
        (lambda p: _flip_byte(p / "model.safetensors", 20), "model.safetensors: sha256 mismatch"),
        (lambda p: _flip_byte(p / "state.json", 3), "state.json: sha256 mismatch"),
        (lambda p: _flip_byte(p / "metrics.json", 3), "metrics.json: sha256 mismatch"),
        (lambda p: _flip_byte(p / "COMPLETE", 2), "corrupted COMPLETE marker"),
        (lambda p: (p / "optimizer.safetensors").unlink(), "optimizer.safetensors: missing"),
        (
            lambda p: (p / "model.safetensors").write_bytes(b"x"),
            "model.safetensors: size mismatch",
        ),
        # a FIFO would make a blocking open wait forever
        (lambda p: _fifo(p / "COMPLETE"), "COMPLETE cannot be read: it is a FIFO"),
        (lambda p: _fifo(p / "state.json"), "state.json: cannot be read: it is a FIFO"),
    ],
)
def test_latest_skips_damaged_checkpoint_with_warning(tmp_path, damage, reason):
    mgr = _three(tmp_path)
    newest = tmp_path / "epoch-00002"
    damage(newest)
    latest, warned = _latest_with_warnings(mgr)
    assert latest == tmp_path / "epoch-00001"
    assert len(warned) == 1 and str(newest) in warned[0] and reason in warned[0], warned
    with pytest.warns(CheckpointWarning, match=reason):
        assert mgr.load().epoch == 1  # a run directory falls back to the previous one
    with pytest.raises(CheckpointError, match=reason) as info:
        mgr.load(newest)  # an explicit checkpoint directory does not
    assert str(newest) in str(info.value)
    with pytest.raises(CheckpointError, match=reason):
        resolve_checkpoint(newest)
    with pytest.warns(CheckpointWarning):
        assert _names(mgr.list()) == ["epoch-00000", "epoch-00001"]


def test_no_valid_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    assert mgr.latest() is None and mgr.best() is None and mgr.list() == []
    with pytest.raises(CheckpointError, match="missing"):
        mgr.load()
    _save(mgr, 0)
    (tmp_path / "run" / "epoch-00000" / "COMPLETE").unlink()
    latest, warned = _latest_with_warnings(mgr)
    assert latest is None and len(warned) == 1
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no complete"):
        mgr.load()


def test_pruning_removes_corrupted_but_never_valid_needed_ones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=False)
    for epoch in range(3):
        _save(mgr, epoch)
    _flip_byte(tmp_path / "epoch-00002" / "model.safetensors")
    with pytest.warns(CheckpointWarning, match="removing corrupted checkpoint"):
        _save(mgr, 3)
    # epoch 1 survives: with 2 corrupted, only 1 and 3 are valid
    assert sorted(os.listdir(tmp_path)) == [
        ".frostline-checkpoints.lock",
        "epoch-00001",
        "epoch-00003",
    ]


def test_prune_failure_warns_but_keeps_the_saved_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=1, keep_best=False)
    _save(mgr, 0)
    real_rename = os.rename

    def no_trash(src, dst):
        if ".tmp-" in os.path.basename(dst):
            raise PermissionError(13, "Permission denied (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", no_trash)
    with pytest.warns(CheckpointWarning, match="saved, but removing old checkpoints failed"):
        path = _save(mgr, 1)
    monkeypatch.undo()
    assert mgr.load().path == path


def test_concurrent_writers_are_serialized(tmp_path):
    import threading

    errors: list[BaseException] = []

    def writer(epochs):
        try:
            mgr = CheckpointManager(tmp_path, keep_last=3, keep_best=False)
            for epoch in epochs:
                _save(mgr, epoch)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(range(k, 12, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    mgr = CheckpointManager(tmp_path, keep_last=3)
    assert _names(mgr.list()) == ["epoch-00009", "epoch-00010", "epoch-00011"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".epoch-")]


def test_stale_temps_are_cleaned_and_interrupted_replace_is_recovered(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 0)
    _save(mgr, 1)
    # Simulate crashes: a half-written checkpoint, and a fallback replace of epoch 1
    # interrupted after the old directory was renamed aside.
    (tmp_path / ".epoch-00002.tmp-dead01").mkdir()
    (tmp_path / ".epoch-00002.tmp-dead01" / "model.safetensors").write_bytes(b"partial")
    os.rename(tmp_path / "epoch-00001", tmp_path / ".epoch-00001.old-dead02")
    (tmp_path / ".epoch-00001.tmp-dead03").mkdir()
    latest, warned = _latest_with_warnings(mgr)
    assert latest == tmp_path / ".epoch-00001.old-dead02" and warned == []
    assert mgr.load().epoch == 1
    _save(mgr, 2)
    assert sorted(os.listdir(tmp_path)) == [
        ".frostline-checkpoints.lock",
        "epoch-00000",
        "epoch-00001",
        "epoch-00002",
    ]
    assert mgr.load(tmp_path / "epoch-00001").epoch == 1


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run / "checkpoints")
    _save(mgr, 0)
    _save(mgr, 1)
    assert resolve_checkpoint(run) == run / "checkpoints" / "epoch-00001"
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "epoch-00001"
    assert resolve_checkpoint(str(run / "checkpoints" / "epoch-00000")).name == "epoch-00000"
    assert load_checkpoint(run).epoch == 1
    with pytest.raises(CheckpointError, match="missing: no such file or directory"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="got a file"):
        resolve_checkpoint(run / "checkpoints" / "epoch-00000" / "COMPLETE")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints found") as info:
        resolve_checkpoint(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_checkpoints_never_use_pickle(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle/torch.save/torch.load must not be used")

    for mod, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "dump"),
        (pickle, "dumps"),
        (pickle, "Unpickler"),
        (pickle, "Pickler"),
        (torch, "load"),
        (torch, "save"),
    ]:
        monkeypatch.setattr(mod, name, forbidden)
    mgr = CheckpointManager(tmp_path)
    rng_t, rng_meta = capture_rng()
    mgr.save(0, {**_tensors(0), "rng": rng_t}, {"rng": rng_meta}, {"val_loss": 1.0})
    ckpt = mgr.load()
    restore_rng(ckpt.tensors["rng"], ckpt.state["rng"])


# ------------------------------------------------------------------ optimizer state


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.unused = nn.Parameter(torch.ones(2))  # never gets a grad -> no optimizer state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _groups(model: _Net, base_lr: float) -> list[dict]:
    return [
        {"params": list(model.body[0].parameters()), "lr": base_lr * 0.5},
        {"params": [*model.body[2].parameters(), model.unused]},
    ]


OPTIMIZERS = {
    "sgd_nesterov": lambda g, lr: torch.optim.SGD(
        g, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "sgd_dampening": lambda g, lr: torch.optim.SGD(
        g, lr=lr, momentum=0.8, dampening=0.1, weight_decay=1e-2
    ),
    "adam": lambda g, lr: torch.optim.Adam(g, lr=lr, betas=(0.8, 0.99), weight_decay=1e-4),
    "adam_amsgrad": lambda g, lr: torch.optim.Adam(g, lr=lr, amsgrad=True),
    "adamw": lambda g, lr: torch.optim.AdamW(g, lr=lr, weight_decay=0.05),
    "rmsprop": lambda g, lr: torch.optim.RMSprop(g, lr=lr, momentum=0.9, weight_decay=1e-4),
    "rmsprop_centered": lambda g, lr: torch.optim.RMSprop(g, lr=lr, momentum=0.5, centered=True),
}


def _batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _train(model, opt, batches, scheduler=None) -> None:
    device = next(model.parameters()).device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(_bits(a), _bits(b)), what


def _assert_same_optimizer_state(opt_a, opt_b) -> None:
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for idx, entry in sa["state"].items():
        assert entry.keys() == sb["state"][idx].keys()
        for key, value in entry.items():
            other = sb["state"][idx][key]
            if isinstance(value, torch.Tensor):
                _assert_bitwise_equal(value, other, f"state[{idx}][{key}]")
            else:
                assert value == other


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_roundtrip_is_bitwise(tmp_path, name):
    make = OPTIMIZERS[name]
    torch.manual_seed(0)
    model_a = _Net()
    opt_a = make(_groups(model_a, 0.02), 0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    _train(model_a, opt_a, _batches(5, seed=1), sched)  # lr now differs from the initial one

    tensors, meta = optimizer_state_to_tensors(opt_a, parameter_names(model_a))
    assert "state/body.0.weight/" + next(iter(opt_a.state[model_a.body[0].weight])) in tensors
    assert not any(k.startswith("state/unused/") for k in tensors)
    json.dumps(meta, allow_nan=False)  # plain JSON
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, {"model": model_a.state_dict(), "optimizer": tensors}, {"optimizer": meta}, {})

    # restore into a differently initialised model and a fresh optimizer with another lr
    torch.manual_seed(123)
    model_b = _Net()
    ckpt = mgr.load()
    model_b.load_state_dict(ckpt.tensors["model"])
    opt_b = make(_groups(model_b, 0.7), 0.7)
    optimizer_state_from_tensors(
        opt_b, ckpt.tensors["optimizer"], ckpt.state["optimizer"], dict(model_b.named_parameters())
    )
    _assert_same_optimizer_state(opt_a, opt_b)

    more = _batches(6, seed=2)
    _train(model_a, opt_a, more)
    _train(model_b, opt_b, more)
    for (na, pa), (nb, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb
        _assert_bitwise_equal(pa, pb, na)
    _assert_same_optimizer_state(opt_a, opt_b)


def _continue_both_and_compare(model_a, opt_a, model_b, opt_b) -> None:
    more = _batches(4, seed=7)
    _train(model_a, opt_a, more)
    _train(model_b, opt_b, more)
    for (na, pa), (nb, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb
        _assert_bitwise_equal(pa, pb, na)


def test_optimizer_restore_into_reordered_unnamed_group(tmp_path):
    torch.manual_seed(0)
    model_a = _Net()
    opt_a = torch.optim.AdamW(list(model_a.named_parameters()), lr=0.01)  # with param_names
    _train(model_a, opt_a, _batches(3, seed=3))
    tensors, meta = optimizer_state_to_tensors(opt_a, parameter_names(model_a))
    assert meta["param_groups"][0]["param_names"] == [n for n, _ in model_a.named_parameters()]

    model_b = copy.deepcopy(model_a)
    opt_b = torch.optim.AdamW(list(reversed(list(model_b.parameters()))), lr=0.01)
    optimizer_state_from_tensors(opt_b, tensors, meta, dict(model_b.named_parameters()))
    assert "param_names" not in opt_b.param_groups[0]
    _continue_both_and_compare(model_a, opt_a, model_b, opt_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("flags", [{"fused": True}, {"capturable": True}, {"foreach": True}])
def test_optimizer_roundtrip_cuda(tmp_path, flags):
    torch.manual_seed(0)
    model_a = _Net().cuda()
    opt_a = torch.optim.Adam(model_a.parameters(), lr=0.01, **flags)
    _train(model_a, opt_a, _batches(3, seed=3))
    tensors, meta = optimizer_state_to_tensors(opt_a, parameter_names(model_a))
    mgr = CheckpointManager(tmp_path)
    mgr.save(0, {"optimizer": tensors}, {"optimizer": meta}, {})
    ckpt = mgr.load()
    model_b = copy.deepcopy(model_a)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=0.5, **flags)
    optimizer_state_from_tensors(
        opt_b, ckpt.tensors["optimizer"], ckpt.state["optimizer"], dict(model_b.named_parameters())
    )
    _assert_same_optimizer_state(opt_a, opt_b)
    _continue_both_and_compare(model_a, opt_a, model_b, opt_b)


def test_optimizer_non_tensor_state_and_tensor_hyperparameters():
    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state[p]
                    st["count"] = st.get("count", 0) + 1
                    st["note"] = None
                    st["hist"] = (1.5, st["count"])
            return super().step(closure)

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = CountingSGD(model.parameters(), lr=torch.tensor(0.1), momentum=0.9)
    _train(model, opt, [(torch.randn(4, 3), torch.randn(4, 2))] * 3)
    tensors, meta = optimizer_state_to_tensors(opt, {p: n for n, p in model.named_parameters()})
    assert meta["state"]["weight"]["values"] == {"count": 3, "note": None, "hist": [1.5, 3]}
    assert "param_groups/0/lr" in tensors
    opt2 = CountingSGD(model.parameters(), lr=torch.tensor(0.5), momentum=0.9)
    optimizer_state_from_tensors(opt2, tensors, meta, dict(model.named_parameters()))
    assert opt2.state[model.weight]["count"] == 3
    assert opt2.state[model.weight]["hist"] == (1.5, 3) or opt2.state[model.weight]["hist"] == [
        1.5,
        3,
    ]
    assert float(opt2.param_groups[0]["lr"]) == pytest.approx(0.1)


def test_optimizer_mismatch_lists_differences():
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.Adam(_groups(model, 0.01), lr=0.01)
    _train(model, opt, _batches(1, seed=0))
    tensors, meta = optimizer_state_to_tensors(opt, parameter_names(model))

    other = _Net()
    wrong = torch.optim.Adam(
        [{"params": [*other.body.parameters()]}, {"params": [other.unused]}], lr=0.01
    )
    with pytest.raises(CheckpointError) as info:
        optimizer_state_from_tensors(wrong, tensors, meta, dict(other.named_parameters()))
    msg = str(info.value)
    assert (
        "param_groups[0]: in optimizer but not in checkpoint: ['body.2.weight', 'body.2.bias']"
        in msg
    )
    assert "param_groups[1]: in checkpoint but not in optimizer: ['body.2.weight'" in msg

    single = torch.optim.Adam(other.parameters(), lr=0.01)
    with pytest.raises(CheckpointError, match="checkpoint has 2 param group"):
        optimizer_state_from_tensors(single, tensors, meta, dict(other.named_parameters()))
    with pytest.raises(CheckpointError, match="not in params_by_name"):
        optimizer_state_from_tensors(wrong, tensors, meta, {})
    with pytest.raises(ValueError, match="has no entry in `names`"):
        optimizer_state_to_tensors(opt, {})


# ---------------------------------------------------------------------------- RNG


def _draw() -> list:
    out = [random.random(), random.gauss(0, 1), random.getrandbits(64)]
    out += np.random.rand(3).tolist() + [float(np.random.standard_normal())]
    out += torch.rand(3).tolist() + torch.randn(2).tolist()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out += torch.rand(2, device=f"cuda:{i}").tolist()
    return out


def test_rng_roundtrip_through_checkpoint(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian (gauss_next) in python's state
    np.random.standard_normal()  # ...and in numpy's (has_gauss)
    tensors, meta = capture_rng()
    expected = _draw()
    CheckpointManager(tmp_path).save(0, {"rng": tensors}, {"rng": meta}, {})
    _draw()  # move every generator on
    ckpt = load_checkpoint(tmp_path)
    restore_rng(ckpt.tensors["rng"], ckpt.state["rng"])
    assert _draw() == expected


def test_restore_rng_is_all_or_nothing():
    tensors, meta = capture_rng()
    before = random.getstate()
    broken = {k: v for k, v in tensors.items() if k != "torch/cpu"}
    with pytest.raises(CheckpointError, match="torch/cpu"):
        restore_rng(broken, meta)
    assert random.getstate() == before
    with pytest.raises(CheckpointError, match="not frostline.rng"):
        restore_rng(tensors, {})
    short = {**tensors, "numpy/keys": tensors["numpy/keys"][:10]}
    with pytest.raises(CheckpointError, match="'numpy/keys' is torch.int64 \\(10,\\)"):
        restore_rng(short, meta)
    assert random.getstate() == before


def test_restore_rng_warns_about_missing_cuda_devices():
    tensors, meta = capture_rng()
    n = meta["cuda"]["device_count"]
    meta = {**meta, "cuda": {"device_count": n + 1}}
    tensors = {**tensors, f"cuda/{n}": torch.zeros(16, dtype=torch.uint8)}
    with pytest.warns(CheckpointWarning, match="not restored"):
        restore_rng(tensors, meta)


# ------------------------------------------------------------------------- crashes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TESTS.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


class _Server:
    """Drives tests/io/_crash_writer.py (a warm process that forks writer children)."""

    def __init__(self) -> None:
        env = _env()
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "_crash_writer.py"), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ready = False  # it imports torch while the first (cold) writer runs

    def ensure_ready(self) -> None:
        if not self.ready:
            assert self.readline(120) == "ready"
            self.ready = True

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "crash writer server did not answer"
        line = self.proc.stdout.readline()
        assert line, f"crash writer server exited with {self.proc.wait()}"
        return line.strip()

    def ask(self, command: str) -> str:
        self.ensure_ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.readline(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError):
                    stream.close()


def _wait_for_epoch_after(directory: Path, epoch: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if any(n.startswith("epoch-") and int(n[6:]) > epoch for n in os.listdir(directory)):
                return
        time.sleep(0.005)
    raise AssertionError(f"the writer made no progress past epoch {epoch} in {timeout}s")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="POSIX only")
def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path):
    """SIGKILL a checkpoint writer at random moments (many mid-write), restart, verify.

    After every kill: latest() loads with valid hashes and no warning, epochs never go
    backwards, the newest keep_last epochs and the best epoch so far are all present.
    """
    sys.path.insert(0, str(TESTS))
    try:
        import _crash_writer as writer
    finally:
        sys.path.remove(str(TESTS))
    directory = tmp_path / "run"
    rng = random.Random(20240607)
    server = _Server()
    kills = mid_write = 0
    last_epoch = -1
    proc: subprocess.Popen[str] | None = None
    t0 = time.monotonic()
    try:
        for i in range(30):
            cold = i % 15 == 0  # now and then a cold `python _crash_writer.py write` process
            if cold:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        str(TESTS / "_crash_writer.py"),
                        "write",
                        str(i),
                        str(directory),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=_env(),
                )
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
                pid = proc.pid
            else:
                pid = int(server.ask(f"start {i} {directory}").split()[1])
            if i % 4 == 3:
                # Guarantee progress whatever the disk speed: wait for a new epoch first.
                _wait_for_epoch_after(directory, last_epoch, timeout=10)
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(pid, signal.SIGKILL)
            if cold:
                assert proc.wait(30) == -signal.SIGKILL, "the writer died on its own"
                proc.stdout.close()
            else:
                status = int(server.ask(f"reap {pid}").split()[1])
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                    "the writer died on its own (see captured stderr)"
                )
            kills += 1
            if directory.exists() and any(n.startswith(".epoch-") for n in os.listdir(directory)):
                mid_write += 1  # killed while a checkpoint was being written/replaced/pruned

            mgr = CheckpointManager(directory, keep_last=writer.KEEP_LAST)
            latest, warned = _latest_with_warnings(mgr)
            assert warned == [], warned  # never a visible half-written checkpoint
            if latest is None:
                assert last_epoch == -1
                continue
            ckpt = mgr.load(latest)  # hashes verified
            assert ckpt.epoch >= last_epoch, "epochs went backwards"
            last_epoch = ckpt.epoch
            expected = writer.tensors_for(ckpt.epoch)
            for group, tensors in expected.items():
                for name, t in tensors.items():
                    assert torch.equal(ckpt.tensors[group][name], t)
            assert ckpt.state == {"epoch": ckpt.epoch}
            # the newest keep_last epochs and the best one so far are all still there
            kept = {int(p.name.split("-")[1].split(".")[0]) for p in mgr.list()}
            newest = set(range(max(0, ckpt.epoch - writer.KEEP_LAST + 1), ckpt.epoch + 1))
            assert newest <= kept, (newest, kept)
            losses = {e: writer.loss_for(e) for e in range(ckpt.epoch + 1)}
            finite = {e: v for e, v in losses.items() if not math.isnan(v)}
            if finite:
                best_epoch = min(finite, key=lambda e: (finite[e], e))
                assert mgr.best() == directory / f"epoch-{best_epoch:05d}"
    finally:
        server.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - t0
    print(f"{kills} kills, {mid_write} mid-write, reached epoch {last_epoch} in {elapsed:.1f}s")
    assert kills >= 20
    assert mid_write >= 3, "too few kills landed during a write to exercise recovery"
    assert last_epoch >= 6  # guaranteed by the 7 progress waits
