"""The ``frostline`` command line end to end: fit, demo, summary, bad input, --help.

Commands run in-process through ``frostline.app.cli.main(argv)`` (no interpreter start-up);
one test runs the installed console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frostline.app import cli, report
from frostline.app.commands import fit
from frostline.app.imagefolder import InputError, load_npz, stratified_split

RUN_FILES = {
    "report.md",
    "metrics.json",
    "metrics.csv",
    "curves.png",
    "freeze_map.png",
    "model.safetensors",
    "preprocessing.json",
}
COLORS = ("red", "green", "blue")


def write_folder(
    root: Path, classes=COLORS, per_class: int = 6, size: int = 32, seed: int = 0
) -> Path:
    """PNG images, one subfolder per class; class c has a bright channel c."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 70, (size, size, 3)).astype(np.uint8)
            a[..., c % 3] += 170
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_no_run_dir(out_dir: Path) -> None:
    assert not out_dir.exists(), f"{out_dir} was left behind"
    parent = out_dir.parent
    if parent.exists():
        leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp-")]
        assert not leftovers, leftovers


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert lines[0].startswith("frostline: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def assert_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


# ------------------------------------------------------------------------- fit end to end


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """One ``frostline fit`` on 3 classes x 6 PNGs (32 px) plus one corrupt file, 1+1 epochs."""
    tmp = tmp_path_factory.mktemp("fit")
    data = write_folder(tmp / "data")
    (data / "green" / "broken.png").write_bytes(b"not a png at all")
    out = tmp / "runs" / "fit-run"
    argv = [
        "fit",
        data,
        "--image-size",
        32,
        "--epochs1",
        1,
        "--epochs2",
        1,
        "--unfreeze-last",
        2,
        "--out",
        out,
        "--seed",
        1,
    ]
    so, se = StringIO(), StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        code = cli.main([str(a) for a in argv])
    return {"code": code, "out": so.getvalue(), "err": se.getvalue(), "dir": out}


def test_fit_image_folder_end_to_end(fit_run):
    assert fit_run["code"] == 0, fit_run["err"]
    run_dir = fit_run["dir"]
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES | {"skipped.csv"}
    assert_png(run_dir / "curves.png")
    assert_png(run_dir / "freeze_map.png")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [p["name"] for p in metrics["phases"]] == ["phase 1", "phase 2"]
    assert all(len(p["history"]["loss"]) == 1 for p in metrics["phases"])
    assert metrics["dataset"]["num_classes"] == 3
    assert metrics["phases"][0]["trainable_params"] < metrics["phases"][1]["trainable_params"]
    assert all(p["verified"] for p in metrics["phases"])
    out = fit_run["out"]
    assert "Before freezing:" in out and "After freezing:" in out
    assert "frozen weights verified" in out
    assert re.search(r"phase 1: validation accuracy \d+\.\d%", out)
    # the corrupt file: a warning that counts it, one that names it, then training goes on
    warn = [ln for ln in fit_run["err"].splitlines() if "warning" in ln]
    assert len(warn) == 2 and "1 unreadable file(s) of 19" in warn[0], fit_run["err"]
    assert "'green/broken.png'" in warn[1], fit_run["err"]
    assert "green/broken.png" in (run_dir / "skipped.csv").read_text()
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("run,phase,epoch") and len(rows) == 3


def test_fit_weights_load_back(fit_run):
    import frostline as fl

    model = fl.load(fit_run["dir"] / "model.safetensors")
    assert model.count_params() > 3_000_000
    # the saved trainable state is the end of phase 2: the last two base layers and the head train
    assert 0 < len(model.trainable_weights) < len(model.weights)


# ------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_fast(tmp_path, capsys, monkeypatch):
    import frostline as fl

    calls = []
    real = fl.recipes.two_phase
    monkeypatch.setattr(fl.recipes, "two_phase", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--fast", "--out", out], capsys)
    assert code == 0, err
    assert len(calls) == 1 and calls[0]["unfreeze"] == 5  # phases 1 and 2 are fl.recipes.two_phase
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert_png(out / "curves.png")
    assert_png(out / "freeze_map.png")
    md = (out / "report.md").read_text()
    for name in RUN_FILES - {"report.md"}:
        assert f"]({name})" in md, name
    metrics = json.loads((out / "metrics.json").read_text())
    names = [p["name"] for p in metrics["phases"]]
    assert names == ["phase 1", "phase 2"]
    for phase in metrics["phases"]:
        assert phase["val"]["accuracy"] is not None and phase["verified"]
    assert metrics["baseline"]["val"]["accuracy"] is not None
    assert metrics["baseline"]["epochs"] == 2
    # what the demo prints
    assert stdout.count("Total params:") >= 2  # summary before and after freezing
    assert "held-out accuracy" in stdout and "frozen weights verified" in stdout
    assert re.search(r"\d+\.\d+ s/epoch", stdout)
    csv_runs = {row.split(",")[0] for row in (out / "metrics.csv").read_text().splitlines()[1:]}
    assert csv_runs == {"transfer", "scratch"}
    # the demo's run directory classifies new digits
    digit = Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8)))
    digit.save(tmp_path / "seven.png")
    code, stdout, err = run(["predict", out, tmp_path / "seven.png", "--top-k", "3"], capsys)
    assert code == 0, err
    row = stdout.splitlines()[1].split(",")
    assert row[1] in [str(d) for d in range(10)] and 0 < float(row[2]) <= 1


# ------------------------------------------------------------------------- summary


def _param_lines(text: str) -> dict[str, int]:
    found = {}
    for key in ("Total", "Trainable", "Non-trainable"):
        m = re.search(rf"^{key} params: ([\d,]+)", text, re.M)
        assert m, f"no '{key} params' line in:\n{text}"
        found[key] = int(m.group(1).replace(",", ""))
    return found


def test_summary_in_process(capsys):
    code, out, err = run(
        ["summary", "efficientnet_lite0", "--freeze-all", "--unfreeze-last", "5"], capsys
    )
    assert code == 0, err
    n = _param_lines(out)
    assert n["Total"] == n["Trainable"] + n["Non-trainable"]
    assert 0 < n["Trainable"] < n["Total"]
    assert "unfreeze last(5): 5 layer(s) change" in out


def test_summary_leaves_and_type(capsys):
    code, out, err = run(
        [
            "summary",
            "efficientnet_lite0",
            "--headless",
            "--leaves",
            "--freeze-type",
            "BatchNorm2d,BatchNormAct2d",
        ],
        capsys,
    )
    assert code == 0, err
    assert re.search(r"^\s+0\s+conv_stem", out, re.M)
    n = _param_lines(out)
    assert n["Total"] == n["Trainable"] + n["Non-trainable"] and n["Non-trainable"] > 0


@pytest.mark.slow
def test_console_script_summary():
    """The installed ``frostline`` entry point, in a subprocess."""
    exe = shutil.which("frostline") or str(Path(sys.executable).with_name("frostline"))
    assert Path(exe).exists(), "console script 'frostline' is not installed (pip install -e .)"
    proc = subprocess.run(
        [exe, "summary", "efficientnet_lite0", "--freeze-all", "--unfreeze-last", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    n = _param_lines(proc.stdout)
    assert n["Total"] == n["Trainable"] + n["Non-trainable"]


# ------------------------------------------------------------------------- bad input


@pytest.fixture
def out_dir(tmp_path) -> Path:
    return tmp_path / "runs" / "run"


def test_missing_folder(tmp_path, out_dir, capsys):
    code, _, err = run(["fit", tmp_path / "nope", "--out", out_dir], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "does not exist" in line and "one subfolder of images per class" in line
    assert_no_run_dir(out_dir)
    assert not out_dir.parent.exists()


def test_empty_class_folder(tmp_path, out_dir, capsys):
    data = write_folder(tmp_path / "data", per_class=2, size=8)
    (data / "zebra").mkdir()
    code, _, err = run(["fit", data, "--out", out_dir], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "zebra" in line and "empty" in line
    assert_no_run_dir(out_dir)


def test_single_class(tmp_path, out_dir, capsys):
    data = write_folder(tmp_path / "data", classes=("only",), per_class=3, size=8)
    code, _, err = run(["fit", data, "--out", out_dir], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "single class" in line and "'only'" in line and "at least 2 classes" in line
    assert_no_run_dir(out_dir)


def test_corrupt_images_error_when_a_class_has_none(tmp_path, out_dir, capsys):
    data = write_folder(tmp_path / "data", per_class=4, size=8)
    bad = data / "cats"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    code, _, err = run(["fit", data, "--out", out_dir], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "cats" in line and "no readable image" in line
    assert_no_run_dir(out_dir)


def test_mostly_unreadable_files(tmp_path, out_dir, capsys):
    data = write_folder(tmp_path / "data", classes=("a", "b"), per_class=1, size=8)
    for cls in ("a", "b"):
        for i in range(3):
            (data / cls / f"notes{i}.txt").write_text("hello")
    code, _, err = run(["fit", data, "--out", out_dir], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "6 of 8 files" in line and "notes0.txt" in line
    assert_no_run_dir(out_dir)


def test_unknown_model_name(tmp_path, out_dir, capsys):
    data = write_folder(tmp_path / "data", per_class=2, size=8)
    code, _, err = run(["fit", data, "--model", "efficientnet_lite9", "--out", out_dir], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "unknown model name 'efficientnet_lite9'" in line and "efficientnet_lite0" in line
    assert_no_run_dir(out_dir)
    code, _, err = run(["summary", "resnet_9000"], capsys)
    assert code == 2 and "unknown model name" in one_line_error(err)


def test_bad_import_path_and_selector(tmp_path, out_dir, capsys):
    data = write_folder(tmp_path / "data", per_class=2, size=8)
    code, _, err = run(
        ["fit", data, "--model", "no_such_pkg.models:build", "--out", out_dir], capsys
    )
    assert code == 2 and "cannot import module 'no_such_pkg.models'" in one_line_error(err)
    code, _, err = run(["summary", "efficientnet_lite0", "--freeze", "nothing.like.this"], capsys)
    assert code == 2 and "matched no layer" in one_line_error(err)
    code, _, err = run(["summary", "efficientnet_lite0", "--freeze", "last:x"], capsys)
    assert code == 2 and "bad selector" in one_line_error(err)
    assert_no_run_dir(out_dir)


def test_out_dir_not_empty(tmp_path, capsys):
    data = write_folder(tmp_path / "data", per_class=2, size=8)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["fit", data, "--out", out], capsys)
    assert code == 2 and "already exists and is not empty" in one_line_error(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_flag_is_one_line(capsys):
    code, _, err = run(["fit", "data", "--epochs1", "-3"], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--epochs1" in lines[0] and "--help" in lines[0]


def test_failure_while_writing_leaves_no_run_dir(tmp_path, capsys, monkeypatch):
    """A run that fails after training (here: the disk 'fills up') removes its temporary folder."""
    data = write_folder(tmp_path / "data", per_class=3, size=16)
    out = tmp_path / "runs" / "r"

    def boom(path, *args, **kwargs):  # as the kernel says it: errno text and the temporary path
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report, "plot_freeze_map", boom)
    code, _, err = run(
        ["fit", data, "--image-size", 32, "--epochs1", 1, "--validation-split", 0, "--out", out],
        capsys,
    )
    assert code == 1
    line = one_line_error(err)
    assert "the disk is full" in line and repr(str(out)) in line and ".tmp-" not in line
    assert_no_run_dir(out)
    assert not (tmp_path / "runs").exists()  # created by this run, removed with it


def test_run_directory_is_atomic(tmp_path):
    final = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), report.RunDirectory(final) as rd:
        (rd.path / "x").write_text("half")
        raise RuntimeError("crash")
    assert not (tmp_path / "a").exists()
    with report.RunDirectory(final) as rd:
        (rd.path / "x").write_text("whole")
    assert (final / "x").read_text() == "whole"
    with pytest.raises(report.RunDirectoryError):
        report.RunDirectory(final)


# ------------------------------------------------------------------------- config, npz, import path


def test_config_file_and_override(tmp_path):
    toml = tmp_path / "fit.toml"
    toml.write_text(
        'model = "efficientnet_lite0"\nepochs1 = 3\nlr1 = 0.01\nfreeze = ["blocks.0*"]\nunfreeze-last = 2\n'
    )
    ns = cli.build_parser().parse_args(["fit", "data", "--config", str(toml), "--epochs1", "7"])
    opts = fit.options(ns)
    assert opts.epochs1 == 7 and opts.lr1 == 0.01 and opts.unfreeze_last == 2
    assert opts.freeze == ["blocks.0*"] and opts.freeze_all is False
    yaml_file = tmp_path / "fit.yaml"
    yaml_file.write_text("data: imgs\nfreeze_type: [BatchNorm2d]\nbatch_size: 8\n")
    opts = fit.options(
        cli.build_parser().parse_args(["fit", "--config", str(yaml_file), "--freeze-all"])
    )
    assert opts.data == "imgs" and opts.batch_size == 8 and opts.freeze_all is True
    opts = fit.options(cli.build_parser().parse_args(["fit", "imgs"]))
    assert opts.freeze_all is True and opts.epochs1 == 5


def test_config_errors(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("epochz = 3\n")
    code, _, err = run(["fit", "data", "--config", cfg], capsys)
    assert code == 2 and "unknown key 'epochz'" in one_line_error(err)
    cfg.write_text("epochs1 = -1\n")
    code, _, err = run(["fit", "data", "--config", cfg], capsys)
    assert code == 2 and "epochs1" in one_line_error(err)
    code, _, err = run(["fit", "--config", tmp_path / "missing.yaml"], capsys)
    assert code == 2 and "does not exist" in one_line_error(err)


def test_npz_loading(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((6, 10, 12), np.uint8), y=np.array(["a", "b", "c", "a", "b", "c"]))
    ds = load_npz(p, 16)
    assert ds.x.shape == (6, 16, 16, 3) and ds.class_names == ["a", "b", "c"] and ds.is_images
    np.savez(p, x=np.zeros((4, 5), np.float32), y=np.array([3, 7, 3, 7]))
    ds = load_npz(p, 16)
    assert not ds.is_images and ds.y.tolist() == [0, 1, 0, 1] and ds.class_names == ["3", "7"]
    np.savez(p, inputs=np.zeros(3), labels=np.zeros(3))
    with pytest.raises(InputError, match="expected arrays named 'x'"):
        load_npz(p, 16)
    tr, va = stratified_split(np.array([0] * 5 + [1] * 5), 0.2, seed=0)
    assert len(va) == 2 and set(np.array([0] * 5 + [1] * 5)[va]) == {0, 1}


FACTORY = """
from torch import nn

def build(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes),
    )
"""


def test_fit_npz_with_import_path_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny_factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        x=rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8),
        y=np.arange(12) % 2,
    )
    out = tmp_path / "run"
    code, stdout, err = run(
        [
            "fit",
            "d.npz",
            "--model",
            "tiny_factory:build",
            "--image-size",
            8,
            "--epochs1",
            1,
            "--epochs2",
            1,
            "--unfreeze-last",
            1,
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    p1, p2 = metrics["phases"]
    assert p1["trainable_params"] == 4 * 2 + 2  # --freeze-all keeps the head (last leaf) trainable
    assert p2["trainable_params"] == p1["trainable_params"] + 8  # + the BatchNorm's weight and bias
    assert "unfreeze last(2)" in stdout


# ------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["demo", "--help"],
        ["fit", "--help"],
        ["summary", "--help"],
        ["predict", "--help"],
        ["evaluate", "--help"],
    ],
)
def test_help(argv, capsys):
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert out.startswith("usage: frostline")
    assert "MISSING" not in out  # a required positional has no "(default: ...)"
    words = {
        "demo": "--fast",
        "fit": "--unfreeze-last",
        "summary": "--leaves",
        "predict": "--top-k",
        "evaluate": "--out DIR",
    }
    if len(argv) == 2:
        assert words[argv[0]] in out
    else:
        assert "demo" in out and "fit" in out and "summary" in out


def test_no_command_is_usage_error(capsys):
    code, _, err = run([], capsys)
    assert code == 2 and "required" in err
