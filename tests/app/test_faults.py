"""Faults a real disk and a real user cause: an unwritable or full --out found before any
training, signals that leave nothing half-written, and temporary folders of killed runs
swept by a later run.

Fits use a two-layer factory model on 8x8 PNGs, so each takes a second or two.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frostline.app import cli, outputs, report

FACTORY = """
from torch import nn

def build(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4), nn.ReLU(), nn.Linear(4, num_classes))
"""
SRC = str(Path(__file__).resolve().parents[2] / "src")


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and "warning" not in ln]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert lines[0].startswith("frostline: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def here(tmp_path, monkeypatch):
    """tmp_path as the working directory, with the factory module and a 2-class folder."""
    (tmp_path / "tiny_nets.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            a = rng.integers(0, 60, (8, 8, 3)).astype(np.uint8)
            a[..., c] += 180
            Image.fromarray(a).save(tmp_path / "data" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    return tmp_path


FIT = ["fit", "data", "--model", "tiny_nets:build", "--image-size", "8", "--epochs1", "1"]


def no_training(monkeypatch) -> list:
    """Record (and refuse) any training: the checks must come before it."""
    from frostline.app import training

    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(training, "train_two_phase", refuse)
    return calls


# ----------------------------------------------------------------------------- --out checked first


def test_out_under_a_file_is_refused_before_training(here, capsys, monkeypatch):
    trained = no_training(monkeypatch)
    (here / "afile").write_text("x")
    code, _, err = run([*FIT, "--out", "afile/run"], capsys)
    line = one_line_error(err)
    assert code == 2 and not trained
    assert "'afile/run' is inside" in line and "which is a file, not a folder" in line


def test_unwritable_out_is_refused_in_plain_words_before_training(here, capsys, monkeypatch):
    """The folder cannot be written (a read-only disk, as the kernel reports it)."""
    trained = no_training(monkeypatch)
    (here / "ro").mkdir()
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).parent.resolve() == (here / "ro").resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    code, _, err = run([*FIT, "--out", "ro/run"], capsys)
    line = one_line_error(err)
    assert code == 2 and not trained
    assert "--out 'ro/run' cannot be written: the disk is read-only" in line
    assert ".tmp-" not in line and "probe" not in line and "Errno" not in line


def test_a_full_disk_is_refused_before_training(here, capsys, monkeypatch):
    trained = no_training(monkeypatch)
    real = outputs.shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    code, _, err = run([*FIT, "--out", "runs/full"], capsys)
    line = one_line_error(err)
    assert code == 2 and not trained
    assert "not enough free space" in line and "1.0 MB free" in line and "'runs/full'" in line
    assert not (here / "runs").exists()
    # room for the run directory, not for the checkpoints as well
    need = report.expected_bytes(__import__("tiny_nets").build(2))
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * need))
    code, _, err = run([*FIT, "--out", "runs/full", "--checkpoint-dir", "ck"], capsys)
    line = one_line_error(err)
    assert code == 2 and not trained and "--checkpoint-dir 'ck': not enough free space" in line


def test_evaluate_and_predict_outputs_are_checked_first(here, capsys, monkeypatch):
    code, _, err = run([*FIT, "--out", "run"], capsys)
    assert code == 0, err
    (here / "afile").write_text("x")
    trust = ["--trust", "tiny_nets"]
    code, out, err = run(["evaluate", "run", "data", *trust, "--out", "afile/e"], capsys)
    assert code == 2 and "which is a file, not a folder" in one_line_error(err) and not out
    (here / "locked").mkdir()
    monkeypatch.setattr(os, "mkdir", _refuse_in(here / "locked"))
    code, out, err = run(["evaluate", "run", "data", *trust, "--out", "locked/e"], capsys)
    assert code == 2 and "permission denied" in one_line_error(err) and not out
    code, out, err = run(["predict", "run", "data", *trust, "--csv", "locked/p.csv"], capsys)
    assert code == 2 and "--csv 'locked/p.csv' cannot be written" in one_line_error(err)


def _refuse_in(folder: Path):
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if Path(path).parent.resolve() == folder.resolve():
            raise OSError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    return refuse


def test_predict_csv_write_failure_is_plain(here, capsys, monkeypatch):
    code, _, err = run([*FIT, "--out", "run"], capsys)
    assert code == 0, err

    def full(src, dst):  # the disk fills up as the predictions are written
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(os, "replace", full)
    code, _, err = run(["predict", "run", "data", "--trust", "tiny_nets", "--csv", "p.csv"], capsys)
    line = one_line_error(err)
    assert code == 1 and "could not write the predictions 'p.csv': the disk is full" in line
    assert ".tmp-" not in line


# ----------------------------------------------------------------------------- signals


SLOW_WRITE = """
import sys, time
sys.path.insert(0, {src!r})
from frostline.app import cli, report
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(60)
report.plot_freeze_map = slow
sys.exit(cli.main({argv!r}))
"""


def start_slow_fit(here: Path, out: str) -> subprocess.Popen:
    """A fit in a child process that stops for a minute while writing its run directory."""
    argv = [*FIT, "--out", out]
    script = here / "slow_fit.py"
    script.write_text(textwrap.dedent(SLOW_WRITE.format(src=SRC, argv=argv)))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{here}", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=here,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    for line in child.stdout:  # wait until the temporary run directory is being written
        if line.startswith("writing"):
            break
    else:
        raise AssertionError(f"the fit ended before writing: {child.wait()} {child.stderr.read()}")
    return child


def temp_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_final_write_removes_the_temporary_folder(here, sig):
    child = start_slow_fit(here, "runs/r")
    assert temp_dirs(here / "runs"), "the run directory was not being written"
    child.send_signal(sig)
    code = child.wait(120)
    err = child.stderr.read()
    assert code == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert not (here / "runs").exists(), list((here / "runs").iterdir())  # created by it, removed


@pytest.mark.slow
def test_a_killed_run_leaves_a_folder_the_next_run_sweeps(here, capsys):
    child = start_slow_fit(here, "runs/r")
    left = temp_dirs(here / "runs")
    child.kill()
    child.wait(120)
    assert temp_dirs(here / "runs") == left and len(left) == 1
    owner = json.loads((here / "runs" / left[0] / outputs.OWNER_FILE).read_text())
    assert owner["pid"] == child.pid
    # a folder with no owner file, and one whose owner is alive, are not touched
    (here / "runs" / ".other.tmp-abc").mkdir()
    alive = here / "runs" / ".live.tmp-def"
    alive.mkdir()
    outputs.claim(alive)
    code, _, err = run([*FIT, "--out", "runs/next"], capsys)
    assert code == 0, err
    assert f"removed {str(Path('runs') / left[0])!r}" in err
    assert temp_dirs(here / "runs") == [".live.tmp-def", ".other.tmp-abc"]
    assert (here / "runs" / "next" / "model.safetensors").is_file()
    assert not (here / "runs" / "next" / outputs.OWNER_FILE).exists()


def test_signal_handlers_are_restored_after_a_command(here, capsys):
    before = {s: signal.getsignal(s) for s in cli.SIGNALS}
    code, _, err = run(["predict", "nowhere", "data"], capsys)
    assert code == 2
    assert {s: signal.getsignal(s) for s in cli.SIGNALS} == before


def test_owner_files_prove_abandonment(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)
    folder = tmp_path / ".run.tmp-1"
    folder.mkdir()
    outputs.claim(folder)
    assert not outputs.abandoned(folder)  # this process: alive
    owner = json.loads((folder / outputs.OWNER_FILE).read_text())
    for change, gone in (
        ({"pid": dead}, True),
        ({"start": "0"}, owner["start"] is not None),  # this pid, another start: reused
        ({"boot": "another-boot"}, owner["boot"] is not None),
        ({"host": "elsewhere", "pid": dead}, False),  # cannot check another machine
    ):
        (folder / outputs.OWNER_FILE).write_text(json.dumps({**owner, **change}))
        assert outputs.abandoned(folder) is gone, change
    (folder / outputs.OWNER_FILE).write_text("{broken")
    assert not outputs.abandoned(folder)
    assert outputs.sweep(tmp_path) == []
    (folder / outputs.OWNER_FILE).write_text(json.dumps({**owner, "pid": dead}))
    assert outputs.sweep(tmp_path) == [folder] and not folder.exists()


def test_run_directory_write_error_names_the_final_path(tmp_path):
    final = tmp_path / "runs" / "a"
    with pytest.raises(outputs.WriteError) as caught, report.RunDirectory(final) as rd:
        raise OSError(errno.ENOSPC, "No space left on device", str(rd.path / "x"))
    assert str(caught.value) == (
        f"could not write the run directory {str(final)!r}: the disk is full; nothing was left behind"
    )
    assert not (tmp_path / "runs").exists()
