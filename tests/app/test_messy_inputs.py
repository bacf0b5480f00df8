"""Images as a user's disk holds them, and run directories as an attacker could write them.

Image modes (16-bit grey, palette with transparency, CMYK, RGBA, LA, EXIF-rotated), every
unreadable file listed, ``predict`` going on past an unreadable file, NaN outputs refused.
Run directories are written by hand (a tiny ``torch.nn`` model saved with ``fl.save`` and a
``preprocessing.json``), so nothing here trains.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import frostline as fl
from frostline.app import cli
from frostline.app.imagefolder import as_rgb, decode_image, load_image_folder
from frostline.app.runinfo import Preprocessing

CLASSES = ["blue", "green", "red"]


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert lines[0].startswith("frostline: error: ") and "Traceback" not in err, err
    return lines[0]


def mean_colour(path: Path) -> list[float]:
    return decode_image(path, 8).reshape(-1, 3).mean(axis=0).tolist()


# ----------------------------------------------------------------------------- image modes


def test_16_bit_grey_png_is_grey_not_white(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((10, 10), 32896, np.uint16)).save(path)  # 50% grey in 16 bits
    with Image.open(path) as im:
        assert im.mode == "I;16"
    assert mean_colour(path) == pytest.approx([128, 128, 128], abs=1)
    ramp = tmp_path / "ramp.png"
    Image.fromarray((np.arange(100).reshape(10, 10) * 600).astype(np.uint16)).save(ramp)
    with Image.open(ramp) as im:
        got = np.asarray(as_rgb(im))[..., 0].astype(int)
    assert got.min() == 0 and got.max() == round(99 * 600 / 257)  # the ramp kept, not clipped
    wide = Image.fromarray(np.full((4, 4), 65535 * 2, np.int32), "I")  # mode I beyond 16 bits
    assert np.asarray(as_rgb(wide)).max() == 255


def test_palette_with_transparency_lands_on_white(tmp_path):
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    for x in range(5):
        for y in range(10):
            pal.putpixel((x, y), 1)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)  # the black half is transparent
    with Image.open(path) as im:
        assert im.mode == "P" and "transparency" in im.info
        got = np.asarray(as_rgb(im))
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 9].tolist() == [255, 255, 255]
    gif = tmp_path / "pal.gif"
    pal.save(gif, transparency=0)
    with Image.open(gif) as im:
        assert np.asarray(as_rgb(im))[0, 9].tolist() == [255, 255, 255]


def test_cmyk_rgba_la_convert_to_the_colours_shown(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, quality=100)  # red ink
    r, g, b = mean_colour(cmyk)
    assert r > 230 and g < 30 and b < 30
    rgba = tmp_path / "rgba.png"
    a = np.zeros((10, 10, 4), np.uint8)
    a[..., 2] = 255  # blue
    a[..., 3] = 128  # half transparent over white: light blue, not pure blue or black
    Image.fromarray(a, "RGBA").save(rgba)
    assert mean_colour(rgba) == pytest.approx([127, 127, 255], abs=2)
    la = tmp_path / "la.png"
    Image.fromarray(
        np.dstack([np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)]), "LA"
    ).save(la)  # black, fully transparent: white
    assert mean_colour(la) == pytest.approx([255, 255, 255], abs=1)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)  # wide, left half red, right half blue
    a[:, :10, 0] = 255
    a[:, 10:, 2] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": a phone held upright
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif.tobytes(), quality=100)
    with Image.open(path) as im:
        assert im.size == (20, 10)
        upright = as_rgb(im)
    assert upright.size == (10, 20)  # tall now
    top, bottom = np.asarray(upright)[1, 5], np.asarray(upright)[18, 5]
    assert top[0] > 200 and top[2] < 50  # the red half is on top
    assert bottom[2] > 200 and bottom[0] < 50


# ----------------------------------------------------------------------------- skipped files


def write_folder(root: Path, per_class: int = 4, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            a[..., 2 - c] += 180
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def test_every_skipped_file_is_listed(tmp_path):
    data = write_folder(tmp_path / "data", per_class=6)
    (data / "red" / "a.png").write_bytes(b"not a png")
    (data / "blue" / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    ds = load_image_folder(data, 8)
    assert sorted(s.path for s in ds.skipped) == ["blue/b.jpg", "red/a.png"]
    assert all(s.reason for s in ds.skipped) and ds.files == 20 and len(ds) == 18


def test_fifos_and_dangling_links_are_listed_not_waited_on(tmp_path):
    import os

    data = write_folder(tmp_path / "data", per_class=6)
    os.mkfifo(data / "red" / "pipe.png")
    (data / "blue" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    ds = load_image_folder(data, 8)
    reasons = {s.path: s.reason for s in ds.skipped}
    assert reasons == {
        "blue/gone.png": "No such file or directory",
        "red/pipe.png": "not a regular file (a FIFO, socket or device)",
    }
    assert ds.files == 20 and len(ds) == 18


def test_fit_lists_every_skipped_file_in_log_report_and_csv(tmp_path, capsys, monkeypatch):
    """Two unreadable files: each named on stderr, in report.md and in skipped.csv."""
    data = write_folder(tmp_path / "data", per_class=6)
    (data / "red" / "a.png").write_bytes(b"not a png")
    (data / "blue" / "b.png").write_bytes(b"neither")
    (tmp_path / "tiny_nets.py").write_text(TINY_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [str(tmp_path), *__import__("sys").path])
    argv = ["fit", data, "--model", "tiny_nets:build", "--image-size", 8, "--epochs1", 1]
    code, _, err = run([*argv, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    warns = [ln for ln in err.splitlines() if "warning" in ln]
    assert "skipped 2 unreadable file(s) of 20" in warns[0]
    assert any("'blue/b.png'" in w for w in warns) and any("'red/a.png'" in w for w in warns)
    rows = list(csv.reader((tmp_path / "run" / "skipped.csv").open()))
    assert rows[0] == ["file", "reason"] and sorted(r[0] for r in rows[1:]) == [
        "blue/b.png",
        "red/a.png",
    ]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Skipped files" in report and "`blue/b.png`" in report and "`red/a.png`" in report
    assert "[skipped.csv](skipped.csv)" in report


TINY_FACTORY = """
from torch import nn

def build(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4), nn.ReLU(), nn.Linear(4, num_classes))
"""


# ----------------------------------------------------------------------------- run directories


def make_run(root: Path, head: nn.Module | None = None, size: int = 8) -> Path:
    """A run directory as ``fit`` writes it, for a torch.nn model (no trust needed)."""
    root.mkdir(parents=True)
    module = nn.Sequential(nn.Flatten(), head or nn.Linear(size * size * 3, len(CLASSES)))
    fl.wrap(module, name="tiny").save(root / "model.safetensors")
    Preprocessing.for_images(CLASSES, size, (0.5,) * 3, (0.5,) * 3, model="tiny").write(root)
    return root


def test_predict_predicts_what_it_can_read_and_lists_the_rest(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, out, err = run(["predict", run_dir, good, bad], capsys)
    assert code == 3, err  # predicted, but not everything
    lines = out.splitlines()
    assert (
        lines[0].startswith("image,class_1") and len(lines) == 2 and lines[1].startswith(str(good))
    )
    assert "skipped 1 unreadable file(s) of 2" in err and f"skipped {str(bad)!r}" in err
    code, out, err = run(["predict", run_dir, good], capsys)
    assert code == 0 and not err
    code, out, err = run(["predict", run_dir, bad], capsys)
    assert code == 2 and "could not be read as images" in one_line_error(err)


def test_nan_outputs_are_an_error_naming_the_file(tmp_path, capsys):
    head = nn.Linear(8 * 8 * 3, len(CLASSES))
    with torch.no_grad():
        head.bias[1] = float("nan")
    run_dir = make_run(tmp_path / "run", head)
    img = tmp_path / "one.png"
    Image.new("RGB", (8, 8), (0, 0, 200)).save(img)
    code, out, err = run(["predict", run_dir, img], capsys)
    assert code == 2 and "nan" not in out.lower()
    line = one_line_error(err)
    assert "NaN or inf" in line and "one.png" in line
    held = tmp_path / "held"
    for name in CLASSES:
        (held / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (0, 0, 200)).save(held / name / "x.png")
    code, out, err = run(["evaluate", run_dir, held], capsys)
    assert code == 2 and "accuracy" not in out
    line = one_line_error(err)
    assert "NaN or inf" in line and "x.png" in line
    assert not (run_dir / "eval").exists()


def test_evaluate_lists_skipped_files_in_its_folder(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    held = write_folder(tmp_path / "held", per_class=4, size=8)
    (held / "green" / "junk.png").write_bytes(b"junk")
    code, out, err = run(["evaluate", run_dir, held], capsys)
    assert code == 0, err
    assert "'green/junk.png'" in err
    rows = list(csv.reader((run_dir / "eval" / "skipped.csv").open()))
    assert [r[0] for r in rows] == ["file", "green/junk.png"]
    record = json.loads((run_dir / "eval" / "evaluation.json").read_text())
    assert [s["file"] for s in record["skipped"]] == ["green/junk.png"]
    assert record["samples"] == 12


def edit_record(run_dir: Path, change) -> None:
    info = json.loads((run_dir / "preprocessing.json").read_text())
    change(info)
    (run_dir / "preprocessing.json").write_text(json.dumps(info))


def setter(key, value):
    def change(info):
        info[key] = value

    return change


def model_file(value):
    def change(info):
        info["model"]["file"] = value

    return change


HOSTILE_RECORDS = {
    "image_size 100000": (setter("image_size", 100000), "image_size is 100000"),
    "image_size 0": (setter("image_size", 0), "from 8 to 4096"),
    "image_size true": (setter("image_size", True), "image_size is True"),
    "image_size float": (setter("image_size", 32.5), "image_size is 32.5"),
    "channels 1": (setter("channels", 1), "channels is 1"),
    "model.file 123": (model_file(123), "model.file is 123"),
    "model.file absolute": (model_file("/etc/passwd"), "a relative path without '..'"),
    "model.file dotdot": (model_file("../model.safetensors"), "a relative path without '..'"),
    "model.file folder": (model_file("."), "is a folder"),
    "model.file missing": (model_file("gone.safetensors"), "has no gone.safetensors"),
    "model not a table": (setter("model", "tiny"), "must record the zoo name"),
    "model kind": (lambda i: i["model"].update(kind="pickle"), "model.kind is 'pickle'"),
    "model extra key": (lambda i: i["model"].update(code="x"), "unexpected key(s) 'code'"),
    "mean NaN": (setter("mean", [float("nan"), 0.5, 0.5]), "mean is [nan, 0.5, 0.5]"),
    "mean short": (setter("mean", [0.5]), "expected 3 finite numbers"),
    "std zero": (setter("std", [0.5, 0.0, 0.5]), "3 positive numbers"),
    "scale": (setter("scale", 1.0), "scaled by 1/255"),
    "resize": (setter("resize", "nearest"), "resizes one way"),
    "color": (setter("color", "CMYK"), "color is 'CMYK'"),
    "class_names one": (setter("class_names", ["a"]), "2 to 100,000 distinct"),
    "class_names int": (setter("class_names", [1, 2]), "2 to 100,000 distinct"),
    "class_names dup": (setter("class_names", ["a", "a"]), "2 to 100,000 distinct"),
    "input": (setter("input", "video"), "input is 'video'"),
    "unknown field": (setter("loader", "os:system"), "unexpected field(s) 'loader'"),
    "missing field": (lambda i: i.pop("class_names"), "lacks the field(s) 'class_names'"),
    "arrays huge": (
        lambda i: i.update(input="arrays", input_shape=[10**9], channels=10**9, image_size=None),
        "input_shape is [1000000000]",
    ),
    "version": (setter("version", 99), "has version 99"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RECORDS))
def test_a_hostile_preprocessing_record_is_one_line_exit_2(tmp_path, capsys, case):
    change, expected = HOSTILE_RECORDS[case]
    run_dir = make_run(tmp_path / "run")
    edit_record(run_dir, change)
    img = tmp_path / "one.png"
    Image.new("RGB", (8, 8), (0, 0, 200)).save(img)
    for argv in (["predict", run_dir, img], ["evaluate", run_dir, tmp_path]):
        code, out, err = run(argv, capsys)
        assert code == 2 and not out, (out, err)
        assert expected in one_line_error(err)


def test_damaged_json_is_one_line_exit_2(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    img = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(img)
    for text in (
        "[" * 100_000,
        '{"format": "frostline.preprocessing", "version": 1' + "9" * 5000 + "}",
    ):
        (run_dir / "preprocessing.json").write_text(text)
        code, _, err = run(["predict", run_dir, img], capsys)
        assert code == 2 and "could not be read as JSON" in one_line_error(err)


def test_symlinks_out_of_the_run_directory_are_refused(tmp_path, capsys):
    outside = make_run(tmp_path / "elsewhere")
    img = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(img)
    run_dir = make_run(tmp_path / "run")
    (run_dir / "model.safetensors").unlink()
    (run_dir / "model.safetensors").symlink_to(outside / "model.safetensors")
    code, out, err = run(["predict", run_dir, img], capsys)
    line = one_line_error(err)
    assert code == 2 and "symbolic link" in line and "outside the run directory" in line
    other = make_run(tmp_path / "run2")
    (other / "preprocessing.json").unlink()
    (other / "preprocessing.json").symlink_to(outside / "preprocessing.json")
    code, out, err = run(["predict", other, img], capsys)
    assert code == 2 and "outside the run directory" in one_line_error(err)
    # a link that stays inside is fine
    inside = make_run(tmp_path / "run3")
    (inside / "model.safetensors").rename(inside / "weights.bin")
    (inside / "model.safetensors").symlink_to("weights.bin")
    code, out, err = run(["predict", inside, img], capsys)
    assert code == 0, err
    # evaluate's default eval/ may not lead out of the run directory either
    (tmp_path / "target").mkdir()
    (inside / "eval").symlink_to(tmp_path / "target")
    held = write_folder(tmp_path / "held", per_class=1, size=8)
    code, out, err = run(["evaluate", inside, held], capsys)
    assert code == 2 and "symbolic link" in one_line_error(err)
    assert not any((tmp_path / "target").iterdir())


def test_a_fifo_as_model_file_is_refused_not_waited_on(tmp_path, capsys):
    import os
    import threading

    run_dir = make_run(tmp_path / "run")
    (run_dir / "model.safetensors").unlink()
    os.mkfifo(run_dir / "model.safetensors")
    img = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(img)
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(cli.main(["predict", str(run_dir), str(img)])), daemon=True
    )
    worker.start()
    worker.join(120)
    assert result == [2], "predict waited on a FIFO"
    assert "not a regular file" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "data", "--image-size", "100000"],
        ["fit", "data", "--image-size", "4"],
        ["demo", "--image-size", "100000"],
        ["summary", "efficientnet_lite0", "--image-size", "100000"],
        ["summary", "efficientnet_lite0", "--num-classes", "1000000000"],
        ["predict", "run", "x.png", "--threads", "100000"],
    ],
)
def test_sizes_on_the_command_line_are_bounded(argv, capsys):
    code, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"frostline {argv[0]}: error: argument" in lines[0]
    assert "expected" in lines[0] and " from " in lines[0], lines


def test_image_size_in_a_config_file_is_bounded(tmp_path, capsys):
    cfg = tmp_path / "fit.toml"
    cfg.write_text('data = "photos"\nimage_size = 100000\n')
    code, _, err = run(["fit", "--config", cfg], capsys)
    line = one_line_error(err)
    assert code == 2 and "'image_size'" in line and "from 8 to 4096" in line


def test_an_npz_header_with_a_huge_shape_is_one_line(tmp_path, capsys):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**12, 64, 64, 3)}
    )
    labels = io.BytesIO()
    np.save(labels, np.zeros(3, np.int64))
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", header.getvalue())
        z.writestr("y.npy", labels.getvalue())
    code, _, err = run(["fit", tmp_path / "huge.npz", "--out", tmp_path / "out"], capsys)
    line = one_line_error(err)  # refused from its header, or (memory unknown) when numpy allocates
    assert code == 2 and ("memory available" in line or "could not be read as an .npz" in line)


def test_an_npz_declaring_more_than_memory_is_refused_before_reading(tmp_path, capsys):
    """A compressed .npz of zeros declares 1 TB in a few KB: refused from its header."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (4096, 4096, 4096, 16)}
    )
    labels = io.BytesIO()
    np.save(labels, np.zeros(4096, np.int64))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue() + bytes(1 << 20))  # the start of the zeros
        z.writestr("y.npy", labels.getvalue())
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    code, _, err = run(["fit", tmp_path / "bomb.npz", "--out", tmp_path / "out"], capsys)
    line = one_line_error(err)
    assert (
        code == 2 and "declares shape (4096, 4096, 4096, 16)" in line and "memory available" in line
    )
