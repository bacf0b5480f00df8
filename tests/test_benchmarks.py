"""The benchmark scripts run, and their sanity checks hold (no wall-clock assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "sweep.py"


def _load_sweep():
    spec = importlib.util.spec_from_file_location("frostline_bench_sweep", SWEEP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep():
    return _load_sweep()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def test_sweep_lists_enough_architectures_from_each_library(sweep):
    args = sweep.parse_args([])
    libraries = {sweep.ARCHS[a].library for a in args.arch_list}
    assert len(args.arch_list) >= 12
    assert libraries == {"timm", "torchvision", "transformers"}
    assert (args.epochs1, args.epochs2, args.device) == (10, 3, "cpu")


def test_sweep_rejects_bad_options(sweep, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--archs", "tv_resnet18,no_such_net"])
    assert "no_such_net" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.parse_args(["--precision", "bf16"])  # bf16 is for --device cuda
    assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.parse_args(["--epochs1", "0"])
    assert "--epochs1 must be >= 1" in capsys.readouterr().err


def _peer(seconds: tuple[float, float], mb: tuple[float, float], loss: tuple[float, float]):
    return {
        "peak_rss_mb": max(mb),
        "phases": [
            {
                "seconds": s,
                "peak_mb": m,
                "loss": lo,
                "trainable_params": 10,
                "cache_last": "x",
                "cpu_seconds": s,
            }
            for s, m, lo in zip(seconds, mb, loss)
        ],
    }


def test_sweep_flags_misses_of_the_targets(sweep):
    args = sweep.parse_args(["--archs", "tv_resnet18"])
    results = {
        "good": {
            "loop": _peer((30.0, 13.0), (900, 900), (1.0, 0.5)),
            "frostline": _peer((5.0, 10.0), (880, 905), (1.01, 0.5)),
        },
        "bad": {
            "loop": _peer((10.0, 5.0), (900, 900), (1.0, 0.5)),
            "frostline": _peer((5.0, 6.0), (1000, 900), (2.0, 0.5)),
        },
        "broken": {
            "loop": _peer((1.0, 1.0), (1, 1), (1, 1)),
            "frostline": {"error": "exit 1: boom"},
        },
        "half": {"loop": _peer((1.0, 1.0), (1, 1), (1, 1)), "frostline": _peer((0.1,), (1,), (1,))},
    }
    results["half"]["frostline"]["phases"].append({"error": "AttributeError: phase 2 broke"})
    rows = {(r["arch"], r["phase"]): r for r in sweep.compare(results, args)}
    assert rows["good", 1]["flags"] == [] and rows["good", 2]["flags"] == []
    assert rows["good", 1]["speedup"] == pytest.approx(6.0)
    assert rows["bad", 1]["flags"] == ["LOSS", "<3x", "MEM"]
    assert rows["bad", 2]["flags"] == ["SLOWER"]
    assert rows["broken", 1]["flags"] == ["ERROR"] and "boom" in rows["broken", 1]["error"]
    assert rows["half", 1]["flags"] == [] and rows["half", 1]["speedup"] == pytest.approx(10.0)
    assert rows["half", 2]["flags"] == ["ERROR"] and "phase 2 broke" in rows["half", 2]["error"]
    lines = sweep.table(list(rows.values()), args)
    assert lines[0].startswith("| arch | phase | loop s | frostline s | speed-up")
    assert len(lines) == 2 + len(rows)
    assert any(
        "flagged:" in n and "bad p1: LOSS <3x MEM" in n
        for n in sweep.summary(list(rows.values()), args)
    )


@pytest.mark.slow
def test_every_architecture_builds_and_names_its_blocks(sweep):
    """Each model builds from its tiny config, and phase 2's block lies inside the backbone."""
    import torch

    args = sweep.parse_args(["--archs", ",".join(sweep.ARCHS)])
    for name in args.arch_list:
        arch = sweep.ARCHS[name]
        net = arch.build(args)
        backbone = sweep.resolve_path(net, arch.backbone)
        block = sweep.resolve_path(net, arch.last_block)
        assert block.startswith(backbone + "."), (name, backbone, block)
        assert any(True for _ in net.get_submodule(block).parameters()), name
        outside = [n for n, _ in net.named_parameters() if not n.startswith(backbone + ".")]
        assert outside, f"{name}: no head outside the backbone"
        if arch.kind == "tokens":
            x, y = sweep.make_data(arch, sweep.parse_args(["--samples", "4"]))
            with torch.no_grad():
                out = net(**x).logits
        else:
            x, y = sweep.make_data(arch, sweep.parse_args(["--samples", "4", "--image-size", "32"]))
            net.eval()
            with torch.no_grad():
                out = net(x)
        assert out.shape == (4, sweep.NUM_CLASSES), name


@pytest.mark.slow
def test_sweep_quick_runs_and_losses_agree(tmp_path):
    """Two architectures end to end: the table comes out, and frostline's losses are the loop's."""
    out = tmp_path / "sweep.json"
    archs = ["tv_resnet18", "timm_vit_tiny"]
    cmd = [sys.executable, str(SWEEP), "--quick", "--threads", "1", "--archs", ",".join(archs)]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| arch | phase | loop s | frostline s | speed-up" in proc.stdout
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert sorted((r["arch"], r["phase"]) for r in rows) == sorted(
        (a, p) for a in archs for p in (1, 2)
    )
    for r in rows:
        assert "error" not in r, r
        assert r["trainable_params"][0] == r["trainable_params"][1], r
        a, b = r["loop_loss"], r["frostline_loss"]
        # Same weights, same batches in the same order, no dropout: the same losses up to
        # float rounding (BatchNorm folding, a different summation order).
        assert math.isfinite(a) and math.isfinite(b)
        assert abs(a - b) <= 1e-3 + 5e-3 * abs(a), r
        assert f"| {r['arch']} | {r['phase']} |" in proc.stdout
    trainable = {(r["arch"], r["phase"]): r["trainable_params"][0] for r in rows}
    assert all(trainable[a, 2] > trainable[a, 1] for a in archs)  # phase 2 unfroze a block
    for arch in archs:
        for peer in ("loop", "frostline"):
            losses = [p["losses"] for p in payload["results"][arch][peer]["phases"]]
            assert [len(v) for v in losses] == [2, 1]


def test_sweep_doctests(sweep):
    import doctest

    assert doctest.testmod(sweep).failed == 0


def test_measure_doctests(sweep):
    """benchmarks/measure.py, which sweep.py and two_phase.py import from beside themselves."""
    import doctest

    measure = sys.modules["measure"]  # imported by loading sweep.py
    assert Path(measure.__file__).resolve() == ROOT / "benchmarks" / "measure.py"
    result = doctest.testmod(measure)
    assert result.attempted > 0 and result.failed == 0


def test_split_time_runs_and_reports_every_tree():
    """benchmarks/split_time.py: one row per model, a ratio per extra tree, its doctests."""
    import doctest

    script = ROOT / "benchmarks" / "split_time.py"
    spec = importlib.util.spec_from_file_location("frostline_bench_split_time", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
    src = str(ROOT / "src")
    cmd = [sys.executable, str(script), "--models", "vit_tiny", "--repeat", "1", "--inner", "1"]
    proc = subprocess.run(
        [*cmd, "--src", src, "--src", src], capture_output=True, text=True, env=_env(), check=True
    )
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| vit_tiny |")]
    assert len(rows) == 1 and rows[0].endswith("| 0.head_drop |"), proc.stdout
    assert f"{src} / {src}: vit_tiny " in proc.stdout
