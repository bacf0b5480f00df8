"""benchmarks/augment.py runs tiny end to end, and its report checks what it claims."""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "augment.py"


def _load():
    spec = importlib.util.spec_from_file_location("frostline_bench_augment", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "augment.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_augment_doctests_and_options():
    bench = _load()
    assert doctest.testmod(bench).failed == 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--workloads", "augment,mixup"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda", "--peers", "frostline,keras"])


def test_report_flags_a_miss_of_the_targets():
    bench = _load()
    args = bench.parse_args(["--quick"])
    phase = {"seconds": 2.0, "peak_mb": 110.0, "losses": [1.0], "val_accuracy": 0.5}
    results = {
        "frostline": {"dropout": dict(phase, losses=[1.5])},
        "frostline_nocache": {"dropout": dict(phase)},
        "torch": {"dropout": dict(phase, seconds=4.0, peak_mb=100.0)},
    }
    lines = bench.report(results, args)
    assert "target dropout >= 3x the savvy loop: 2.00x MISSED" in "\n".join(lines)
    assert "peak memory 1.10 of the loop (<= 1.02) MISSED" in "\n".join(lines)
    assert "losses dropout equal cache=False: NO" in lines


@pytest.mark.slow
def test_augment_quick_runs_and_frostline_losses_equal_cache_off(tmp_path):
    stdout, payload = _run(tmp_path, "--peers", "frostline,frostline_nocache,torch")
    assert "| workload | peer | seconds | CPU seconds | images/s" in stdout
    assert "frostline augment vs torch augment: " in stdout and "x (CPU time: " in stdout
    assert all(p["cpu_seconds"] > 0 for r in payload["results"].values() for p in r.values())
    assert "losses augment equal cache=False: yes" in stdout
    assert "losses dropout equal cache=False: yes" in stdout
    res = payload["results"]
    assert sorted(res["frostline"]) == ["augment", "augment_views=2", "dropout"]
    assert sorted(res["torch"]) == ["augment", "dropout"]
    views = res["frostline"]["augment_views=2"]
    assert "augmented view 2 of 2" in views["cache"]
    assert len(views["losses"]) == 2 and all(v > 0 for v in views["losses"])


@pytest.mark.slow
def test_augment_keras_peer_runs(tmp_path):
    stdout, payload = _run(tmp_path, "--peers", "keras", "--workloads", "augment")
    phase = payload["results"]["keras"]["augment"]
    assert phase["seconds"] > 0 and len(phase["losses"]) == 2
    assert "| augment | keras |" in stdout


def test_compile_frozen_doctests():
    """benchmarks/compile_frozen.py (torch.compile of the frozen part: measured, not used)."""
    spec = importlib.util.spec_from_file_location(
        "frostline_bench_compile", ROOT / "benchmarks" / "compile_frozen.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
