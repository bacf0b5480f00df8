"""Does progressive freezing pay? A plain fine-tune vs ``fl.schedules.ProgressiveFreezing``.

Two models, each fine-tuned whole on scikit-learn's digits (upscaled to ``--size`` RGB,
``benchmarks/two_phase.py``'s ``make_data``; ``--train`` images trained, the rest of the
1797 held out) for ``--epochs`` epochs, Adam, batch 64:

* ``lite0``: the offline default, ``fl.models.pretrained("efficientnet_lite0",
  num_classes=10)`` (ImageNet weights);
* ``vit``: a small ViT (timm ``vit_tiny_patch16_224`` at ``--size`` px, patch 8,
  depth 6, random weights: nothing is downloaded).

Two peers, each in its own subprocess with the same seed (same weights, same batches):
``plain`` (``fit``) and ``progressive`` (``fit`` with ``ProgressiveFreezing(criterion=
--criterion, tolerance=--tolerance)`` on the model's own stages: frozen stages run
without autograd, their output cached and extended stage by stage). Reported: wall
time of ``compile`` + ``fit``, the speed-up, held-out accuracy and its difference,
the stages frozen and when. ``--repeat N`` interleaves and keeps the fastest run.
Target: >= 1.5x with held-out accuracy within 1 point of the plain fit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import Phase, machine_info  # noqa: E402
from two_phase import make_data  # noqa: E402

MODELS = ("lite0", "vit")
PEERS = ("plain", "progressive")
LR = {"lite0": 3e-4, "vit": 1e-3}


def data(args: argparse.Namespace):
    """``--train`` digits for training and the rest of the 1797 held out (shuffled once)."""
    x, y = make_data(1797, args.size, "NCHW")
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[: args.train], order[args.train :]
    return x[tr], y[tr], x[te], y[te]


def build(name: str, args: argparse.Namespace):
    import timm

    import frostline as fl

    if name == "lite0":
        return fl.models.pretrained("efficientnet_lite0", num_classes=10)
    net = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=args.size,
        patch_size=8, depth=6,
    )  # fmt: skip
    return fl.wrap(net, name="vit")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import frostline as fl

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(args.threads)
    xt, yt, xv, yv = data(args)
    torch.manual_seed(0)
    model = build(args.model, args)
    cbs = []
    if args.worker == "progressive":
        cbs.append(
            fl.schedules.ProgressiveFreezing(
                start_epoch=1, criterion=args.criterion, tolerance=args.tolerance
            )
        )
    with Phase(False) as p:
        model.compile(
            fl.optimizers.Adam(LR[args.model]), "sparse_categorical_crossentropy", ["accuracy"]
        )
        h = model.fit(xt, yt, batch_size=64, epochs=args.epochs, verbose=0, seed=0, callbacks=cbs)
    held = model.evaluate(xv, yv, batch_size=256, verbose=0, return_dict=True)
    out: dict[str, Any] = {
        "seconds": p.seconds,
        "peak_mb": p.peak_mb,
        "losses": h.history["loss"],
        "epoch_times": h.history.get("epoch_time"),
        "val_accuracy": held["accuracy"],
    }
    if cbs:
        log = cbs[0].log
        out["freezes"] = [(e["epoch"], e["groups"]) for e in log if e["action"] == "freeze"]
        out["stages"] = [g.name for g in cbs[0].groups]
        out["cache"] = [e["cache"].split(" (")[0] for e in log if e["action"] == "epoch"]
    return out


def _peer(model: str, peer: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="progressive-") as tmp:
        res = Path(tmp) / "r.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", peer, "--model", model]
        cmd += ["--result", str(res), "--size", str(args.size), "--train", str(args.train)]
        cmd += ["--epochs", str(args.epochs), "--threads", str(args.threads)]
        cmd += ["--criterion", args.criterion, "--tolerance", str(args.tolerance)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not res.exists():
            raise RuntimeError(f"{model}/{peer} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return json.loads(res.read_text())


def report(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One row per model: times, speed-up, held-out accuracies, what froze; target checks.

    >>> r = {"lite0": {"plain": {"seconds": 30.0, "val_accuracy": 0.95},
    ...                "progressive": {"seconds": 15.0, "val_accuracy": 0.945,
    ...                                "freezes": [(2, ["blocks.0"])], "cache": ["off"]}}}
    >>> report(r)[-1]
    'target lite0 >= 1.5x with held-out accuracy within 1 point: 2.00x, -0.5 points MET'
    """
    lines = [
        "| model | plain s | progressive s | speed-up | held-out acc plain | progressive | freezes (epoch: stages) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    checks = []
    for m, r in results.items():
        a, b = r["plain"], r["progressive"]
        s = a["seconds"] / b["seconds"]
        d = 100 * (b["val_accuracy"] - a["val_accuracy"])
        fz = "; ".join(f"{e}: {', '.join(g)}" for e, g in b.get("freezes", [])) or "none"
        lines.append(
            f"| {m} | {a['seconds']:.2f} | {b['seconds']:.2f} | {s:.2f}x | "
            f"{a['val_accuracy']:.3f} | {b['val_accuracy']:.3f} | {fz} |"
        )
        ok = s >= 1.5 and d >= -1.0
        checks.append(
            f"target {m} >= 1.5x with held-out accuracy within 1 point: {s:.2f}x, {d:+.1f} points "
            f"{'MET' if ok else 'MISSED'}"
        )
    return lines + [""] + checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; ``--quick`` is a smoke run.

    >>> a = parse_args([])
    >>> (a.size, a.train, a.epochs, a.criterion, a.tolerance, a.model_list)
    (64, 600, 10, 'weight_change', 0.35, ['lite0', 'vit'])
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--peers", default=",".join(PEERS), help="plain,progressive (both: the table)")
    p.add_argument("--size", type=int, default=None, help="image side (default 64)")
    p.add_argument("--train", type=int, default=None, help="training digits (default 600)")
    p.add_argument("--epochs", type=int, default=None, help="default 10")
    p.add_argument("--criterion", default="weight_change", choices=("weight_change", "grad_norm"))
    p.add_argument("--tolerance", type=float, default=0.35)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run (32 px, 64 images, 2 epochs)")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, full, quick in (("size", 64, 32), ("train", 600, 64), ("epochs", 10, 2)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.peer_list = [m.strip() for m in args.peers.split(",") if m.strip()]
    if not args.peer_list or set(args.peer_list) - set(PEERS):
        p.error(f"--peers: choose from {','.join(PEERS)}, got {args.peers!r}")
    if not args.model_list or set(args.model_list) - set(MODELS):
        p.error(f"--models: choose from {','.join(MODELS)}, got {args.models!r}")
    if not 1 <= args.train < 1797 or args.epochs < 1 or args.repeat < 1:
        p.error("--train must be in [1, 1796], --epochs and --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(run(args)))
        return 0
    load = os.getloadavg()
    print(
        f"progressive freezing: {args.train} digits at {args.size} px, {args.epochs} epochs, "
        f"criterion {args.criterion} (tolerance {args.tolerance}), {args.threads} threads; "
        f"load {load[0]:.2f}",
        flush=True,
    )
    runs: dict[str, dict[str, list]] = {m: {p: [] for p in args.peer_list} for m in args.model_list}
    for rep in range(args.repeat):
        for m in args.model_list:
            for peer in args.peer_list:
                r = _peer(m, peer, args)
                runs[m][peer].append(r)
                print(
                    f"  [{rep + 1}/{args.repeat}] {m} {peer}: {r['seconds']:.2f} s, held-out "
                    f"{r['val_accuracy']:.3f}, freezes {r.get('freezes', '-')} "
                    f"(load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    results = {
        m: {p: min(rs, key=lambda r: r["seconds"]) for p, rs in per.items()}
        for m, per in runs.items()
    }
    lines = report(results) if len(args.peer_list) == len(PEERS) else []
    print("\n" + "\n".join(lines))
    print(f"\nload before/after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {"machine": machine_info(), "results": results, "runs": runs, "table": lines},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
