"""What building a split costs: ``Runner.verify`` (the randomness watch, the trace and its
probe, the partition) on frozen models at 32 px, one thread.

Each source tree named by ``--src`` (the frostline checked out at another commit; the
default is this checkout) is measured in its own subprocesses, the trees interleaved,
``--repeat`` times; each subprocess takes the best of ``--inner`` splits of a freshly built
model per architecture. The report is the best per tree and architecture, and each tree's
ratio to the first.

    python benchmarks/split_time.py                              # this checkout
    python benchmarks/split_time.py --src /tmp/old --src src      # before / after

Example:
    >>> sorted(MODELS)
    ['convnext_atto', 'mobilenet_v2', 'resnet18', 'vit_tiny']
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _timm(name: str, **kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        import timm
        from torch import nn

        base = timm.create_model(name, pretrained=False, num_classes=0, **kw)
        base.requires_grad_(False)
        return nn.Sequential(base, nn.Linear(base.num_features, 10))

    return build


def _mobilenet_v2() -> Any:
    """torchvision's MobileNetV2, its ``classifier`` (Dropout + Linear) trainable."""
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    net.requires_grad_(False)
    net.classifier.requires_grad_(True)
    return net


MODELS: dict[str, Callable[[], Any]] = {
    "resnet18": _timm("resnet18"),
    "convnext_atto": _timm("convnext_atto"),
    "vit_tiny": _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4),
    "mobilenet_v2": _mobilenet_v2,
}


def measure(names: list[str], inner: int) -> dict[str, dict[str, Any]]:
    """Best of ``inner`` ``Runner.verify`` calls per model: wall and CPU milliseconds."""
    import torch

    from frostline.core import batchnorm
    from frostline.engine.runner import Runner

    torch.set_num_threads(1)
    x = torch.randn(8, 3, 32, 32)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        best = cpu = float("inf")
        for _ in range(inner):
            torch.manual_seed(0)
            model = MODELS[name]()
            batchnorm.install_all(model)  # as fl.wrap does: frozen BatchNorms infer
            model.train()
            runner = Runner(model)
            start, start_cpu = time.perf_counter(), time.process_time()
            runner.verify(x)
            best = min(best, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
        out[name] = {"ms": best * 1000, "cpu_ms": cpu * 1000, "boundary": runner.boundary_name}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", action="append", help="a frostline src folder (repeatable)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.models.split(",")
    if args.child:
        print(json.dumps(measure(names, args.inner)))
        return 0
    srcs = [str(Path(s).resolve()) for s in (args.src or [str(ROOT / "src")])]
    best: dict[str, dict[str, float]] = {s: {} for s in srcs}
    cpu: dict[str, dict[str, float]] = {s: {} for s in srcs}
    boundary: dict[str, dict[str, str]] = {s: {} for s in srcs}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeat):
        for src in srcs:
            env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
            cmd = [sys.executable, __file__, "--child", "--models", args.models]
            cmd += ["--inner", str(args.inner)]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True).stdout)
            for name, r in res.items():
                best[src][name] = min(best[src].get(name, float("inf")), r["ms"])
                cpu[src][name] = min(cpu[src].get(name, float("inf")), r["cpu_ms"])
                boundary[src][name] = r["boundary"]
        load.append(os.getloadavg()[0])
    print(
        f"split time (Runner.verify), best of {args.repeat} x {args.inner}, one thread; "
        f"load average {min(load):.1f}-{max(load):.1f}"
    )
    print("| model | " + " | ".join(f"{s}: ms (CPU ms)" for s in srcs) + " | boundary |")
    print("| --- " * (len(srcs) + 2) + "|")
    for name in names:
        cells = [_cell(best[s][name], cpu[s][name]) for s in srcs]
        print(f"| {name} | " + " | ".join(cells) + f" | {boundary[srcs[-1]][name]} |")
    if len(srcs) > 1:
        for s in srcs[1:]:
            ratios = ", ".join(
                f"{n} {best[s][n] / best[srcs[0]][n]:.2f}x ({cpu[s][n] / cpu[srcs[0]][n]:.2f}x CPU)"
                for n in names
            )
            print(f"{s} / {srcs[0]}: {ratios}")
    return 0


def _cell(ms: float, cpu_ms: float) -> str:
    """``"123 (118)"``: wall and CPU milliseconds.

    >>> _cell(123.4, 118.2)
    '123 (118)'
    """
    return f"{ms:.0f} ({cpu_ms:.0f})"


if __name__ == "__main__":
    raise SystemExit(main())
