"""One schema for flags and config files; one import-path resolver; the run directory is fsynced."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from frostline.app import cli, report
from frostline.app.commands import fit
from frostline.app.config import UsageError, config_keys, read_config


def fit_flags() -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices["fit"]._actions if a.dest not in ("help",)}


def test_every_fit_option_is_a_flag_and_a_config_key():
    fields = {f.name for f in dataclasses.fields(fit.Options) if "flag" in f.metadata}
    assert fit_flags() == fields
    assert set(config_keys(fit.Options)) == fields - {"config"}


@pytest.mark.parametrize(
    ("key", "value"),
    [("epochs1", "-1"), ("lr1", "0"), ("validation_split", "1.5"), ("batch_size", "x")],
)
def test_flag_and_file_reject_a_value_with_the_same_words(tmp_path, capsys, key, value):
    flag = "--" + key.replace("_", "-")
    assert cli.main(["fit", "data", flag, value]) == 2
    flag_err = capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'{key} = "{value}"\n')
    with pytest.raises(UsageError) as e:
        read_config(cfg, fit.Options)
    expected = flag_err.split(": ", 2)[-1].split(" (see")[0].split(f"{flag}: ")[-1]
    assert expected in str(e.value) and key in str(e.value)


def test_file_types_are_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    for text, words in [
        ("freeze_all: 1\n", "true or false"),
        ("freeze: 3\n", "list of strings"),
        ("batchnorm: sometimes\n", "one of inference, auto, batch_stats"),
        ("epochs1: [1]\n", "a single value"),
        ("config: other.toml\n", "unknown key 'config'"),
    ]:
        cfg.write_text(text)
        with pytest.raises(UsageError, match=words):
            read_config(cfg, fit.Options)


def test_the_cli_resolves_import_paths_through_the_library(monkeypatch):
    from frostline.api import loading
    from frostline.app.models import import_factory

    seen = []
    real = loading.import_path
    monkeypatch.setattr(loading, "import_path", lambda t, *a: seen.append(t) or real(t, *a))
    assert import_factory("torch.nn:Linear").__name__ == "Linear"
    assert seen == ["torch.nn:Linear"]
    with pytest.raises(
        UsageError, match="--model 'torch.nn:Nope': module 'torch.nn' has no attribute 'Nope'"
    ):
        import_factory("torch.nn:Nope")


def test_run_directory_fsyncs_every_file_and_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    final = tmp_path / "runs" / "r"
    with report.RunDirectory(final) as run:
        (run.path / "a.txt").write_text("a")
        (run.path / "sub").mkdir()
        (run.path / "sub" / "b.txt").write_text("b")
        tmp_name = run.path.name
    assert (final / "sub" / "b.txt").read_text() == "b"
    names = {os.path.basename(p) for p in synced}
    assert {"a.txt", "b.txt", "sub", tmp_name, "runs"} <= names, synced


def test_fit_trains_through_two_phase(tmp_path, monkeypatch, capsys):
    """The CLI's two phases are fl.recipes.two_phase, with the flags' freeze, unfreeze and rates."""
    import numpy as np

    import frostline as fl

    (tmp_path / "two_phase_nets.py").write_text(
        "from torch import nn\n"
        "def build(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Linear(6, num_classes))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    rng = np.random.default_rng(0)
    np.savez("d.npz", x=rng.normal(size=(16, 12)).astype("float32"), y=np.arange(16) % 2)
    calls = []
    real = fl.recipes.two_phase

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fl.recipes, "two_phase", spy)
    argv = ["fit", "d.npz", "--model", "two_phase_nets:build", "--unfreeze-last", "1"]
    argv += ["--epochs1", "1", "--epochs2", "2", "--lr2", "1e-4", "--batchnorm", "batch_stats"]
    assert cli.main([*argv, "--out", "run"]) == 0, capsys.readouterr().err
    (kw,) = calls
    assert (kw["phase1_epochs"], kw["phase2_epochs"], kw["phase2_lr"]) == (1, 2, 1e-4)
    assert kw["unfreeze"] == 2 and kw["bn_inference"] == "batch_stats"  # + the head, for a factory
    assert kw["freeze"].description == "~(last(1))"  # --freeze-all keeps a factory's head
    assert cli.main(["fit", "d.npz", "--model", "two_phase_nets:build", "--out", "run2"]) == 0
    assert calls[1]["phase2_epochs"] == 0  # no --unfreeze-last: phase 1 only


def test_phase_record_reads_the_typed_cache_status():
    import numpy as np
    from torch import nn

    import frostline as fl
    from frostline.app import training

    base = fl.wrap(nn.Sequential(nn.Linear(4, 4)), name="b")
    model = fl.Sequential([base, nn.Linear(4, 2)])
    base.trainable = False
    x, y = np.random.default_rng(0).random((8, 4), dtype=np.float32), np.arange(8) % 2
    phase = training.train_plain(
        model, x, y, name="p", title="t", epochs=2, lr=1e-3, batch_size=4, seed=0, verbose=0
    )
    assert phase["cache_built"] and phase["cache"].startswith("train: reused")
    assert "incl. building the activation cache" in training.describe_phase(phase, "validation")
    assert phase["verified"] and len(phase["history"]["loss"]) == 2
