"""benchmarks/progressive.py runs tiny end to end, and its report checks what it claims."""

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
SCRIPT = ROOT / "benchmarks" / "progressive.py"


def _load():
    spec = importlib.util.spec_from_file_location("frostline_bench_progressive", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_progressive_doctests_options_and_misses():
    bench = _load()
    assert doctest.testmod(bench).failed == 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "lite0,resnet"])
    slow = {"seconds": 20.0, "val_accuracy": 0.90, "freezes": []}
    lines = bench.report(
        {"vit": {"plain": {"seconds": 30.0, "val_accuracy": 0.95}, "progressive": slow}}
    )
    assert lines[-1] == (
        "target vit >= 1.5x with held-out accuracy within 1 point: 1.50x, -5.0 points MISSED"
    )


@pytest.mark.slow
def test_progressive_quick_runs_with_the_same_start(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "p.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", "lite0,vit", "--epochs", "3"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| model | tolerance | plain s | progressive s | speed-up" in proc.stdout
    report = json.loads(out.read_text())
    r = report["results"]["lite0"]
    plain, prog = r["plain"], r["progressive"]
    assert plain["losses"][0] == pytest.approx(prog["losses"][0], rel=1e-5)  # same start
    assert prog["stages"][1:3] == ["blocks.0", "blocks.1"]
    assert len(prog["cache"]) == 3
    # the ViT is pre-trained once on the pool; both peers fine-tune from those weights
    assert "ViT pre-trained on the pool" in proc.stdout
    assert 0 <= report["pretrain"]["pool_accuracy"] <= 1
    v = report["results"]["vit"]
    assert v["plain"]["losses"][0] == pytest.approx(v["progressive"]["losses"][0], rel=1e-5)
    assert v["progressive"]["stages"][1:3] == ["blocks.0", "blocks.1"]


def test_the_vit_starts_from_its_pre_trained_weights(tmp_path):
    bench = _load()
    args = bench.parse_args(["--quick"])
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = bench.vit(args).module
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    args.init = str(path)
    torch.manual_seed(0)
    model = bench.build("vit", args).module
    for name, value in model.state_dict().items():
        same = torch.equal(value, source.state_dict()[name])
        assert same is (name != "head.weight"), name  # a new head (bias: zeros), the rest loaded
    args.init = str(tmp_path / "other.safetensors")
    save_file({"pos_embed": source.pos_embed.detach().contiguous()}, args.init)
    with pytest.raises(RuntimeError, match="pre-trained ViT does not fit"):
        bench.build("vit", args)
