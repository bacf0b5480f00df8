"""The training commands' output and resumption: an 80-column progress line with an ETA,
``--quiet``, and ``--checkpoint-dir`` / ``--resume`` over the API's exact resume."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from frostline.app import cli
from frostline.engine.progress import EpochProgress, ProgressLogger

FACTORY = """
from torch import nn

def build(num_classes):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(8 * 8 * 3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, num_classes)
    )
"""
LOGS = {"loss": 0.25, "accuracy": 0.9, "val_loss": 0.3, "val_accuracy": 0.8}
NOTE = "cache: reused (15 samples after '1', 0.0 MB in memory)"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def epoch_lines(epoch_times, monkeypatch, capsys, columns=None, epochs=8) -> list[str]:
    if columns:
        monkeypatch.setenv("COLUMNS", str(columns))
    else:
        monkeypatch.delenv("COLUMNS", raising=False)
    p = ProgressLogger(2)
    p.set_params({"epochs": epochs, "steps": 4, "epoch_note": NOTE})
    for epoch, t in enumerate(epoch_times):
        p.on_epoch_begin(epoch)
        p.on_train_batch_end(0, {"loss": 0.5})
        p.on_epoch_end(epoch, {**LOGS, "epoch_time": t})
    return capsys.readouterr().out.splitlines()


def test_the_epoch_line_fits_80_columns_and_keeps_every_metric(monkeypatch, capsys):
    lines = epoch_lines([1.5], monkeypatch, capsys, columns=80)
    assert len(lines) > 1 and all(len(ln) <= 80 for ln in lines), lines
    assert lines[0].startswith("Epoch 1/8 - 1.50s - ETA ")
    text = " ".join(lines)
    for part in (
        "loss: 0.2500",
        "accuracy: 0.9000",
        "val_loss: 0.3000",
        "val_accuracy: 0.8000",
        NOTE,
    ):
        assert part in text
    # a log file (no terminal, no COLUMNS) keeps one line per epoch
    lines = epoch_lines([1.5], monkeypatch, capsys)
    assert len(lines) == 1 and lines[0].startswith("Epoch 1/8 - 1.50s - ETA 0:10 - loss: 0.2500")


def test_the_eta_is_the_rest_of_the_fit_at_the_pace_so_far(monkeypatch, capsys):
    lines = epoch_lines([4.0, 1.0, 2.0], monkeypatch, capsys, epochs=10)
    etas = [re.search(r"ETA (\d+:\d\d)", ln).group(1) for ln in lines]
    # 9 left at 4 s; then 8 at 1 s (the first, cache-building epoch left out); then 7 at 1.5 s
    assert etas == ["0:36", "0:08", "0:10"]
    assert "ETA" not in epoch_lines([1.0] * 8, monkeypatch, capsys)[-1]  # nothing left
    assert "ETA 0:07" in epoch_lines([1.0] * 8, monkeypatch, capsys, epochs=15)[-1]


def test_the_bar_fits_80_columns(monkeypatch):
    from rich.console import Console

    monkeypatch.delenv("COLUMNS", raising=False)
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bar = EpochProgress(1, 11, 12, steps=40, console=console, times=[3.0, 1.0])
    for i in range(20):
        bar.update(i, dict(LOGS))
    bar.close(dict(LOGS), elapsed=1.0)  # draws the bar one last time, then erases it
    shown = [ANSI.sub("", ln) for ln in re.split(r"[\r\n]", buf.getvalue())]
    drawn = [ln for ln in shown if "Epoch" in ln]
    assert drawn and all(len(ln.rstrip()) <= 80 for ln in shown), shown
    last = drawn[-1]  # the bar as it stands after 20 of 40 steps
    assert last.startswith("Epoch 12/12 ") and "20/40" in last and " ETA " in last, last
    assert "loss: 0.2500" in last


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def here(tmp_path, monkeypatch):
    (tmp_path / "tiny_nets.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "eel")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            a = rng.integers(0, 60, (8, 8, 3)).astype(np.uint8)
            a[..., c] += 180
            Image.fromarray(a).save(tmp_path / "data" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    return tmp_path


FIT = [
    "fit",
    "data",
    "--model",
    "tiny_nets:build",
    "--image-size",
    "8",
    "--epochs1",
    "2",
    "--epochs2",
    "2",
    "--unfreeze-last",
    "1",
    "--lr1",
    "0.05",
    "--lr2",
    "0.01",
]


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quiet_prints_the_run_directory_only(here, capsys):
    code, out, err = run([*FIT, "--quiet", "--out", "q"], capsys)
    assert code == 0, err
    assert out == "q\n" and err == ""
    assert (here / "q" / "model.safetensors").is_file()


def test_fit_at_80_columns_keeps_epoch_numbers_and_metrics(here, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run([*FIT, "--out", "c"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Epoch ")]
    # phase 1 is a fit of 2 epochs, phase 2 goes on to epoch 4
    assert [lines[i].split(" - ")[0] for i in starts] == [
        "Epoch 1/2",
        "Epoch 2/2",
        "Epoch 3/4",
        "Epoch 4/4",
    ]
    for i in starts:
        block = [lines[i]] + [ln for ln in lines[i + 1 : i + 6] if ln.startswith("  - ")]
        assert all(len(ln) <= 80 for ln in block), block
        assert "val_accuracy: " in " ".join(block) and "loss: " in block[0] + block[-1]


def test_resume_gives_the_run_that_never_stopped(here, capsys):
    """--checkpoint-dir, then --resume from the checkpoint after epoch 2 (phase 1's end) and
    after epoch 3 (inside phase 2): the same weights, history and report as the whole run."""
    code, _, err = run([*FIT, "--checkpoint-dir", "ck", "--out", "whole"], capsys)
    assert code == 0, err
    whole = json.loads((here / "whole" / "metrics.json").read_text())
    weights = load_file(here / "whole" / "model.safetensors")
    kept = sorted(p.name for p in (here / "ck").iterdir() if p.name.startswith("epoch-"))
    assert kept == ["epoch-00001", "epoch-00002", "epoch-00003"]  # after epochs 2, 3, 4
    for newest, after in (("epoch-00001", 2), ("epoch-00002", 3)):
        partial = here / f"ck-{after}"
        shutil.copytree(here / "ck", partial)
        for name in kept:
            if name > newest:
                shutil.rmtree(partial / name)
        out_dir = f"resumed-{after}"
        code, out, err = run([*FIT, "--resume", partial, "--out", out_dir], capsys)
        assert code == 0, err
        assert f"resumed from the checkpoint after epoch {after}" in out
        resumed = json.loads((here / out_dir / "metrics.json").read_text())
        assert [p["name"] for p in resumed["phases"]] == ["phase 1", "phase 2"]
        for a, b in zip(whole["phases"], resumed["phases"]):
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                assert a["history"][key] == b["history"][key], (after, key)
            assert a["trainable_params"] == b["trainable_params"]
        again = load_file(here / out_dir / "model.safetensors")
        assert weights.keys() == again.keys()
        assert all(torch.equal(weights[k], again[k]) for k in weights)
        report = (here / out_dir / "report.md").read_text()
        assert f"Resumed from the checkpoint after epoch {after}" in report
        assert resumed["resumed"]["after_epoch"] == after


def test_resume_from_a_folder_without_checkpoints_is_one_line(here, capsys):
    (here / "empty").mkdir()
    code, _, err = run([*FIT, "--resume", "empty", "--out", "x"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "no checkpoints found" in lines[0], err
    code, _, err = run([*FIT, "--resume", "nothing-here", "--out", "x"], capsys)
    assert code == 2 and "--resume 'nothing-here' is not a folder" in err
    code, _, err = run([*FIT, "--checkpoint-dir", "x/ck", "--out", "x"], capsys)
    assert code == 2 and "is inside the run directory 'x'" in err
    assert not (here / "x").exists()


def test_demo_quiet_trains_silently_and_prints_the_run_directory(monkeypatch, capsys):
    from frostline.app.commands import demo

    seen = {}

    def fake_run_demo(cfg, *, command, print_fn=print):
        print_fn("a line quiet must not show")
        seen.update(verbose=cfg.verbose)
        return "runs/demo-x", {}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    code, out, err = run(["demo", "--fast", "--quiet"], capsys)
    assert code == 0 and out == "runs/demo-x\n" and seen == {"verbose": 0}, (out, err)
