"""``frostline predict`` and ``frostline evaluate`` end to end on a run that ``frostline fit`` wrote.

A tiny factory model (a 3x3 conv, BatchNorm, a linear head) fits in seconds on PNGs
written into tmp_path; predictions are checked against the model applied by hand with
the preprocessing the run recorded.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import frostline as fl
from frostline.app import cli

CLASSES = ("blue", "green", "red")
FACTORY = """
from torch import nn

def build(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes),
    )

def mlp(num_classes):
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, num_classes))
"""


def write_images(root: Path, classes=CLASSES, per_class: int = 6, size: int = 20, seed: int = 0):
    """One subfolder per class; class c has a bright channel (c + 2) % 3, so sorted names differ."""
    rng = np.random.default_rng(seed)
    for name in classes:
        c = {"red": 0, "green": 1, "blue": 2}.get(name, 0)
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 70, (size, size + 4 * (i % 2), 3)).astype(
                np.uint8
            )  # not all square
            a[..., c] += 170
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert lines[0].startswith("frostline: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``frostline fit`` on 3 classes x 6 PNGs with the tiny factory (1+1 epochs, 12 px)."""
    tmp = tmp_path_factory.mktemp("predict")
    (tmp / "predict_nets.py").write_text(FACTORY)
    write_images(tmp / "train")
    write_images(tmp / "held_out", per_class=3, seed=1)
    cwd, path = os.getcwd(), list(sys.path)
    os.chdir(tmp)
    try:
        code = cli.main(
            [
                "fit",
                "train",
                "--model",
                "predict_nets:build",
                "--image-size",
                "12",
                "--epochs1",
                "2",
                "--epochs2",
                "1",
                "--unfreeze-last",
                "1",
                "--lr1",
                "0.05",
                "--out",
                "runs/tiny",
            ]
        )
    finally:
        os.chdir(cwd)
        sys.path[:] = path
    assert code == 0
    return tmp


@pytest.fixture
def here(trained, monkeypatch):
    monkeypatch.chdir(trained)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return trained


def by_hand(run_dir: Path, files: list[Path]) -> np.ndarray:
    """The run's model on ``files``, prepared from preprocessing.json by this test's own code."""
    info = json.loads((run_dir / "preprocessing.json").read_text())
    model = fl.load(run_dir / "model.safetensors", trusted_modules=["predict_nets"])
    s = info["image_size"]
    xs = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.resize(
                (s, s), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
            )
            xs.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = (np.stack(xs) - np.array(info["mean"], np.float32)) / np.array(info["std"], np.float32)
    model.module.eval()
    with torch.no_grad():
        logits = model.module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return torch.softmax(logits.double(), dim=1).numpy()


def test_fit_records_the_preprocessing(here):
    info = json.loads((here / "runs/tiny/preprocessing.json").read_text())
    assert info["format"] == "frostline.preprocessing" and info["input"] == "images"
    assert info["class_names"] == list(CLASSES) and info["image_size"] == 12
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406]) and len(info["std"]) == 3
    assert info["model"] == {
        "file": "model.safetensors",
        "spec": "predict_nets:build",
        "kind": "import",
    }


def test_predict_matches_the_recorded_preprocessing(here, capsys):
    out_csv = here / "pred.csv"
    code, out, err = run(
        [
            "predict",
            "runs/tiny",
            "held_out",
            "--top-k",
            "2",
            "--trust",
            "predict_nets",
            "--csv",
            out_csv,
        ],
        capsys,
    )
    assert code == 0, err
    assert "2" in out.split()[0] or "prediction(s) written" in out
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["image", "class_1", "prob_1", "class_2", "prob_2"]
    files = sorted((here / "held_out").rglob("*.png"))
    assert [Path(r[0]).resolve() for r in rows[1:]] == [f.resolve() for f in files]
    probs = by_hand(here / "runs/tiny", files)
    for row, p in zip(rows[1:], probs):
        order = np.argsort(-p, kind="stable")
        assert [row[1], row[3]] == [CLASSES[order[0]], CLASSES[order[1]]]
        assert [float(row[2]), float(row[4])] == pytest.approx(p[order[:2]], abs=1e-4)
        assert float(row[2]) >= float(row[4])


def test_predict_reads_what_the_run_recorded(here, capsys, tmp_path):
    """Another mean/std in preprocessing.json changes the probabilities: nothing is re-guessed."""
    copy = tmp_path / "copy"
    shutil.copytree(here / "runs/tiny", copy)
    info = json.loads((copy / "preprocessing.json").read_text())
    info["mean"], info["std"] = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    (copy / "preprocessing.json").write_text(json.dumps(info))
    img = sorted((here / "held_out").rglob("*.png"))[:1]
    outs = []
    for run_dir in (here / "runs/tiny", copy):
        code, out, err = run(
            ["predict", run_dir, img[0], "--top-k", "3", "--trust", "predict_nets"], capsys
        )
        assert code == 0, err
        outs.append([float(v) for v in out.splitlines()[1].split(",")[2::2]])
    assert outs[0] != pytest.approx(outs[1], abs=1e-6)


def test_predict_prints_csv_when_piped_and_a_table_on_a_terminal(here, capsys, monkeypatch):
    code, out, err = run(
        ["predict", "runs/tiny", "held_out/red", "--trust", "predict_nets"], capsys
    )
    assert code == 0, err
    lines = out.splitlines()
    assert (
        lines[0] == "image,class_1,prob_1,class_2,prob_2,class_3,prob_3"
    )  # --top-k 5 capped at 3 classes
    assert len(lines) == 4
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = run(
        ["predict", "runs/tiny", "held_out/red", "--trust", "predict_nets", "--top-k", "1"], capsys
    )
    assert code == 0, err
    assert out.splitlines()[0].split() == ["image", "top", "1"]
    assert all("%)" in ln for ln in out.splitlines()[2:])


def test_evaluate_accuracy_table_and_confusion_matrix(here, capsys):
    code, out, err = run(["evaluate", "runs/tiny", "held_out", "--trust", "predict_nets"], capsys)
    assert code == 0, err
    files = sorted((here / "held_out").rglob("*.png"))
    truth = np.array([CLASSES.index(f.parent.name) for f in files])
    pred = by_hand(here / "runs/tiny", files).argmax(axis=1)
    acc = float((pred == truth).mean())
    assert f"accuracy: {100 * acc:.1f}% ({int((pred == truth).sum())} of 9)" in out
    for name in CLASSES:
        assert any(ln.split()[:1] == [name] and ln.split()[-1] == "3" for ln in out.splitlines())
    ev = here / "runs/tiny/eval"
    assert sorted(p.name for p in ev.iterdir()) == [
        "confusion_matrix.png",
        "evaluation.json",
        "per_class.csv",
    ]
    record = json.loads((ev / "evaluation.json").read_text())
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (truth, pred), 1)
    assert record["confusion_matrix"] == cm.tolist() and record["accuracy"] == pytest.approx(acc)
    with Image.open(ev / "confusion_matrix.png") as im:
        assert im.format == "PNG" and min(im.size) > 200
    # a second evaluation (one class of the three) replaces the first; --out writes elsewhere
    shutil.copytree(here / "held_out/red", here / "only_red/red", dirs_exist_ok=True)
    code, out, err = run(["evaluate", "runs/tiny", "only_red", "--trust", "predict_nets"], capsys)
    assert code == 0, err
    assert json.loads((ev / "evaluation.json").read_text())["samples"] == 3
    assert "no held-out samples of: blue, green" in out
    code, _, err = run(
        ["evaluate", "runs/tiny", "held_out", "--trust", "predict_nets", "--out", "elsewhere/e"],
        capsys,
    )
    assert code == 0, err
    assert (here / "elsewhere/e/confusion_matrix.png").is_file()


def test_bad_input_is_one_line_with_exit_code_2(here, capsys, tmp_path):
    def error(argv) -> str:
        code, _, err = run(argv, capsys)
        assert code == 2, err
        return one_line_error(err)

    trust = ["--trust", "predict_nets"]
    assert "does not exist" in error(["predict", tmp_path / "nope", "held_out", *trust])
    bare = tmp_path / "bare"
    shutil.copytree(here / "runs/tiny", bare)
    (bare / "preprocessing.json").unlink()
    line = error(["evaluate", bare, "held_out", *trust])
    assert "has no preprocessing.json" in line and "frostline fit" in line
    (tmp_path / "empty").mkdir()
    assert "is empty" in error(["predict", "runs/tiny", tmp_path / "empty", *trust])
    assert "does not exist" in error(["predict", "runs/tiny", tmp_path / "nothing.png", *trust])
    line = error(["predict", "runs/tiny", "held_out", *trust, "--csv", tmp_path / "no/dir/p.csv"])
    assert "--csv" in line and "does not exist" in line
    unknown = write_images(tmp_path / "unknown", classes=("red", "zebra"), per_class=1)
    line = error(["evaluate", "runs/tiny", unknown, *trust])
    assert "'zebra'" in line and "not trained on" in line and "blue, green, red" in line
    line = error(["predict", "runs/tiny", "held_out"])
    assert "predict_nets:build" in line and "--trust predict_nets" in line
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert "already exists" in error(
        ["evaluate", "runs/tiny", "held_out", *trust, "--out", foreign]
    )
    assert (foreign / "notes.txt").read_text() == "keep me"
    broken = tmp_path / "broken"
    shutil.copytree(here / "runs/tiny", broken)
    (broken / "preprocessing.json").write_text("{ not json")
    assert "could not be read as JSON" in error(["predict", broken, "held_out", *trust])


def test_arrays_run_evaluates_npz(tmp_path, capsys, monkeypatch):
    """A run fit on float arrays takes an .npz with x (and y) and refuses images."""
    (tmp_path / "predict_nets.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    rng = np.random.default_rng(0)
    y = np.array(["cat", "dog"] * 10)
    x = rng.normal(size=(20, 6)).astype(np.float32) + (y == "dog")[:, None] * 2
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:6], y=y[:6])
    np.savez(tmp_path / "wide.npz", x=np.zeros((2, 7), np.float32))
    argv = ["fit", "train.npz", "--model", "predict_nets:mlp", "--epochs1", 3, "--out", "run"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "run/preprocessing.json").read_text())
    assert (
        info["input"] == "arrays"
        and info["input_shape"] == [6]
        and info["class_names"] == ["cat", "dog"]
    )
    code, out, err = run(["evaluate", "run", "test.npz", "--trust", "predict_nets"], capsys)
    assert code == 0, err
    assert "6 samples of 2 class(es)" in out
    code, out, err = run(["predict", "run", "test.npz", "--trust", "predict_nets"], capsys)
    assert code == 0 and len(out.splitlines()) == 7, err
    code, _, err = run(["predict", "run", "wide.npz", "--trust", "predict_nets"], capsys)
    assert code == 2 and "shape (7,)" in one_line_error(err)


def test_export_writes_onnx_and_torch_programs_that_match_the_run(here, capsys, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run_dir = here / "runs/tiny"
    code, out, err = run(["export", run_dir, "--trust", "predict_nets"], capsys)
    assert code == 0, err
    assert "input (batch, 3, 12, 12)" in out and (run_dir / "model.onnx").is_file()
    files = sorted((here / "held_out").rglob("*.png"))
    want = by_hand(run_dir, files)
    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    info = json.loads((run_dir / "preprocessing.json").read_text())
    mean, std = np.array(info["mean"], np.float32), np.array(info["std"], np.float32)
    xs = []
    for f in files:  # the same preparation as by_hand, for the exported model's input
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.resize(
                (12, 12), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
            )
            xs.append((np.asarray(im, dtype=np.float32) / 255.0 - mean) / std)
    x = np.stack(xs).transpose(0, 3, 1, 2).copy()
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)

    target = tmp_path / "deploy.pt2"
    code, out, err = run(
        ["export", run_dir, "--format", "torch", "--output", target, "--trust", "predict_nets"],
        capsys,
    )
    assert code == 0, err
    program = torch.export.load(target).module()
    with torch.no_grad():
        probs = torch.softmax(program(torch.from_numpy(x)).double(), dim=1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)

    code, out, err = run(["export", run_dir, "--output", tmp_path / "m.pt2"], capsys)
    assert code == 2 and "onnx files end in .onnx" in one_line_error(err)


def test_predict_and_evaluate_read_images_through_a_store_they_remove(here, capsys, monkeypatch):
    """Images are decoded into a file beside the run directory and read back a batch at a
    time (as fit reads its folder), not held in memory; the store goes with the command."""
    from frostline.app import imagefolder

    made, reads = [], []
    real_read, real_many = imagefolder.read_images, imagefolder.ImageArrayDataset.__getitems__

    def spy_read(*args, **kwargs):
        x, kept, skipped = real_read(*args, **kwargs)
        made.append((type(x), Path(kwargs["store_dir"])))
        return x, kept, skipped

    def spy_many(self, indices):
        reads.append((type(self.images), len(indices)))
        return real_many(self, indices)

    monkeypatch.setattr(imagefolder, "read_images", spy_read)
    monkeypatch.setattr(imagefolder.ImageArrayDataset, "__getitems__", spy_many)
    for argv in (
        ["predict", "runs/tiny", "held_out", "--trust", "predict_nets", "--batch-size", "4"],
        ["evaluate", "runs/tiny", "held_out", "--trust", "predict_nets", "--batch-size", "4"],
    ):
        code, _, err = run(argv, capsys)
        assert code == 0, err
        kind, store = made.pop()
        assert kind is imagefolder.ImageFile
        assert store.parent == (here / "runs").resolve() and store.name.startswith(
            ".frostline-images-"
        )
        assert not store.exists()  # removed when the command ended
        assert reads == [
            (imagefolder.ImageFile, 4),
            (imagefolder.ImageFile, 4),
            (imagefolder.ImageFile, 1),
        ]
        reads.clear()
