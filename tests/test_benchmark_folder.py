"""benchmarks/folder.py runs tiny end to end, and its report checks what it claims."""

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
SCRIPT = ROOT / "benchmarks" / "folder.py"


def _load():
    spec = importlib.util.spec_from_file_location("frostline_bench_folder", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_folder_doctests_options_and_misses():
    bench = _load()
    assert doctest.testmod(bench).failed == 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--peers", "cli,keras"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--classes", "1"])
    cli = {"seconds": 20.0, "epoch_seconds": [15.0, 0.4], "peak_rss_mb": 1100.0}
    loop = {"seconds": 60.0, "epoch_seconds": [12.0, 12.0], "peak_rss_mb": 1000.0}
    for r in (cli, loop):
        r.update(val_accuracy=1.0, all_seconds=[r["seconds"]])
    assert bench.report({"cli": cli, "loop": loop})[-3:] == [
        "target cli >= 5x the loop end to end: 3.00x MISSED",
        "target cached epochs <= 0.1 s: 0.400 s (slowest) MISSED",
        "target peak RSS <= the loop's: 1100 MiB vs 1000 MiB (1.10) MISSED",
    ]
    cli["cpu_seconds"], loop["cpu_seconds"] = 10.0, 45.0
    lines = bench.report({"cli": cli, "loop": loop})
    assert lines[-4].startswith("CPU time of the loop over the CLI's: 4.50x")
    assert lines[2].startswith("| cli | 20.0 | 10.0 | 15.00 |")


@pytest.mark.slow
def test_folder_quick_runs_both_peers(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "f.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| peer | end to end s |" in proc.stdout
    r = json.loads(out.read_text())["results"]
    assert len(r["cli"]["epoch_seconds"]) == len(r["loop"]["epoch_seconds"]) == 2
    assert r["cli"]["cache"].startswith("train: reused")  # the CLI's later epochs are cached
    assert r["cli"]["peak_rss_mb"] > 0 and r["loop"]["peak_rss_mb"] > 0
    assert r["cli"]["cpu_seconds"] > 0 and r["loop"]["cpu_seconds"] > 0
