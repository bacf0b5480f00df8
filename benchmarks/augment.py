"""Does freezing pay on the Keras guide's own model? frostline vs a savvy loop vs Keras 3.

The model of the Keras transfer-learning guide: random augmentation (RandomFlip
"horizontal", RandomRotation(0.1)) in front of a frozen pretrained base, then
Dropout(0.2) and a new Linear/Dense head. Two workloads, each its own phase:

* ``augment``: the augmentation on. The frozen base sees new random input every step,
  so nothing can be cached; frostline runs it as its folded, channels_last copy without
  autograd (``fit`` defaults), the loop runs it in eval mode under ``torch.no_grad``.
  frostline also runs it with ``fit(augment_views=K)`` (``--views``), which caches K
  augmented passes and cycles them: a change of augmentation's semantics, reported on its
  own row with its held-out accuracy.
* ``dropout``: no augmentation, the Dropout head only (phase 1 of the guide on
  deterministic data): frostline may cache the frozen base's output.

The torch peers use ``fl.models.pretrained("efficientnet_lite0")`` (offline ImageNet
weights) and the same augmentation modules (``fl.layers``); Keras 3 (TensorFlow
backend) uses ``keras.applications.EfficientNetB0(weights=None)`` of similar size (the
Keras guide's layers, ``base.trainable = False``). Data: scikit-learn's digits upscaled
to ``--size`` RGB (``benchmarks/two_phase.py``'s ``make_data``), the last 20% held out.

Every peer runs in its own subprocess with the same threads; ``--repeat N`` interleaves
the runs and keeps the fastest per phase. Phase times are wall clock around ``compile`` +
``fit`` (or building the optimizer + the loop), first-call costs included; peak memory
is the RSS high-water mark per phase (``benchmarks/measure.py``). ``--device cuda`` runs
the torch peers on the GPU (bf16 autocast) and reports images/s.

Run ``python benchmarks/augment.py --help``; results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import Phase, device_available, maxrss_mb, write_json  # noqa: E402
from two_phase import make_data  # noqa: E402

PEERS = ("frostline", "frostline_nocache", "torch", "keras")
WORKLOADS = ("augment", "dropout")
NUM_CLASSES = 10
LR = 1e-3
ROTATION = 0.1
DROPOUT = 0.2
HELD_OUT = 0.2


def split(args: argparse.Namespace, layout: str):
    """Training and held-out images and labels (digits shuffled once, the last 20% held out)."""
    x, y = make_data(args.images, args.size, layout)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(len(x) * (1 - HELD_OUT))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    return torch


def _versions() -> dict[str, str]:
    import timm
    import torch

    import frostline as fl

    return {"torch": torch.__version__, "timm": timm.__version__, "frostline": fl.__version__}


def _augmentation(workload: str) -> list:
    import frostline as fl

    if workload != "augment":
        return []
    return [fl.layers.RandomFlip("horizontal"), fl.layers.RandomRotation(ROTATION)]


def run_frostline(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch(args.threads)
    from torch import nn

    import frostline as fl

    cuda = args.device == "cuda"
    xt, yt, xv, yv = split(args, "NCHW")
    phases = []
    runs = [(w, None) for w in args.workload_list]
    if args.worker == "frostline" and "augment" in args.workload_list and args.views:
        runs.append(("augment", args.views))
    for workload, views in runs:
        torch.manual_seed(0)
        base = fl.models.pretrained("efficientnet_lite0", headless=True)
        features = base.module.num_features
        layers = [*_augmentation(workload), base, nn.Dropout(DROPOUT)]
        model = fl.Sequential([*layers, nn.Linear(features, NUM_CLASSES)])
        kw: dict[str, Any] = {"device": args.device}
        if cuda:
            kw["precision"] = "bf16"
        fit_kw: dict[str, Any] = {"cache": args.worker == "frostline"}
        if views:
            fit_kw["augment_views"] = views
        log = io.StringIO()
        with Phase(cuda) as p, contextlib.redirect_stdout(log):
            base.trainable = False
            model.compile(
                fl.optimizers.Adam(LR), "sparse_categorical_crossentropy", ["accuracy"], **kw
            )
            h = model.fit(
                xt, yt, batch_size=args.batch_size, epochs=args.epochs, verbose=2, seed=0, **fit_kw
            )
        notes = re.findall(r"cache: (.*)$", log.getvalue(), flags=re.MULTILINE)
        held = model.evaluate(xv, yv, batch_size=256, verbose=0, return_dict=True)
        name = workload if not views else f"augment_views={views}"
        phases.append(
            {
                "workload": name,
                "seconds": p.seconds,
                "cpu_seconds": p.cpu_seconds,
                "peak_mb": p.peak_mb,
                "losses": h.history["loss"],
                "val_accuracy": held["accuracy"],
                "cache": notes[-1].strip() if notes else None,
            }
        )
        del model, base
    return {"phases": phases, "versions": _versions()}


def run_torch(args: argparse.Namespace) -> dict[str, Any]:
    """The savvy loop: frozen base in eval mode under no_grad, Adam over the head."""
    torch = _torch(args.threads)
    import torch.nn.functional as F
    from torch import nn

    import frostline as fl

    cuda = args.device == "cuda"
    device = torch.device(args.device)
    xt, yt, xv, yv = (torch.from_numpy(a).to(device) for a in split(args, "NCHW"))
    phases = []
    for workload in args.workload_list:
        torch.manual_seed(0)
        base = fl.models.pretrained("efficientnet_lite0", headless=True).module.to(device)
        aug = nn.Sequential(*_augmentation(workload)).to(device)
        head = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(base.num_features, NUM_CLASSES))
        head.to(device)
        amp = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
        n = len(xt)
        with Phase(cuda) as p:
            base.requires_grad_(False)
            base.eval()
            opt = torch.optim.Adam(head.parameters(), lr=LR)
            gen = torch.Generator().manual_seed(0)
            losses = []
            for _ in range(args.epochs):
                total = 0.0
                for idx in torch.randperm(n, generator=gen).split(args.batch_size):
                    idx = idx.to(device)
                    with amp:
                        with torch.no_grad():
                            f = base(aug(xt[idx]))
                        loss = F.cross_entropy(head(f).float(), yt[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                losses.append(total / n)
        base.eval(), head.eval(), aug.eval()
        with torch.no_grad(), amp:
            pred = torch.cat([head(base(b)).argmax(1) for b in xv.split(256)])
        phases.append(
            {
                "workload": workload,
                "seconds": p.seconds,
                "cpu_seconds": p.cpu_seconds,
                "peak_mb": p.peak_mb,
                "losses": losses,
                "val_accuracy": float((pred == yv).float().mean()),
            }
        )
    return {"phases": phases, "versions": _versions()}


def run_keras(args: argparse.Namespace) -> dict[str, Any]:
    """Keras 3 (TensorFlow): the guide's layers around EfficientNetB0, base frozen."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    xt, yt, xv, yv = split(args, "NHWC")
    shape = (args.size, args.size, 3)
    phases = []
    for workload in args.workload_list:
        keras.utils.set_random_seed(0)
        base = keras.applications.EfficientNetB0(
            weights=None, include_top=False, pooling="avg", input_shape=shape
        )
        aug = []
        if workload == "augment":
            aug = [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(ROTATION)]
        model = keras.Sequential(
            [keras.Input(shape), *aug, base, keras.layers.Dropout(DROPOUT)]
            + [keras.layers.Dense(NUM_CLASSES)]
        )
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        with Phase(False) as p:
            base.trainable = False
            model.compile(optimizer=keras.optimizers.Adam(LR), loss=loss, metrics=["accuracy"])
            h = model.fit(xt, yt, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
        held = model.evaluate(xv, yv, batch_size=256, verbose=0, return_dict=True)
        phases.append(
            {
                "workload": workload,
                "seconds": p.seconds,
                "cpu_seconds": p.cpu_seconds,
                "peak_mb": p.peak_mb,
                "losses": [float(v) for v in h.history["loss"]],
                "val_accuracy": float(held["accuracy"]),
            }
        )
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    return {"phases": phases, "versions": versions}


WORKERS = {
    "frostline": run_frostline,
    "frostline_nocache": run_frostline,
    "torch": run_torch,
    "keras": run_keras,
}


def _run_peer(peer: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="augment-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", peer, "--result", str(out)]
        for opt in ("device", "images", "size", "epochs", "batch_size", "threads", "views"):
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
        cmd += ["--workloads", ",".join(args.workload_list)]
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(args.threads)
        env["TF_NUM_INTRAOP_THREADS"] = env["TF_NUM_INTEROP_THREADS"] = str(args.threads)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"peer {peer!r} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def best(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per workload, the fastest of the repeats, with every repeat's seconds.

    >>> r = [{"phases": [{"workload": "a", "seconds": 3.0}]},
    ...      {"phases": [{"workload": "a", "seconds": 2.0}]}]
    >>> best(r)["a"]["seconds"], best(r)["a"]["all_seconds"]
    (2.0, [3.0, 2.0])
    """
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        for phase in run["phases"]:
            w = phase["workload"]
            seen = out.get(w)
            every = [*(seen["all_seconds"] if seen else []), phase["seconds"]]
            if seen is None or phase["seconds"] < seen["seconds"]:
                out[w] = dict(phase)
            out[w]["all_seconds"] = every
    return out


TARGETS = {"augment": 2.0, "dropout": 3.0}


def report(results: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    """The table (markdown), speed-ups against the loop and Keras, and the target checks.

    >>> args = parse_args(["--quick"])
    >>> res = {"frostline": {"augment": {"seconds": 1.0, "peak_mb": 100.0, "losses": [1.0],
    ...        "val_accuracy": 0.5}},
    ...        "torch": {"augment": {"seconds": 3.0, "peak_mb": 100.0, "losses": [1.0],
    ...        "val_accuracy": 0.5}}}
    >>> [line for line in report(res, args) if line.startswith("target")]
    ['target augment >= 2x the savvy loop: 3.00x MET; peak memory 1.00 of the loop (<= 1.02) MET']
    """
    cuda = args.device == "cuda"
    head = (
        "| workload | peer | seconds | CPU seconds | images/s | peak MB | final loss "
        "| held-out accuracy | frostline cache |"
    )
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    seen_per_epoch = int(args.images * (1 - HELD_OUT))
    workloads = sorted({w for r in results.values() for w in r}, key=lambda w: (w[:7], len(w)))
    for w in workloads:
        for peer, r in results.items():
            if w not in r:
                continue
            p = r[w]
            ips = seen_per_epoch * args.epochs / p["seconds"]
            mb = "-" if p.get("peak_mb") is None else f"{p['peak_mb']:.0f}"
            loss = p["losses"][-1] if p.get("losses") else float("nan")
            cpu = "-" if p.get("cpu_seconds") is None else f"{p['cpu_seconds']:.2f}"
            lines.append(
                f"| {w} | {peer} | {p['seconds']:.2f} | {cpu} | {ips:.0f} | {mb} | {loss:.4f} "
                f"| {p['val_accuracy']:.3f} | {p.get('cache') or '-'} |"
            )
    fl = results.get("frostline", {})
    lines.append("")
    for w in workloads:
        if w not in fl:
            continue
        for peer in ("torch", "keras"):
            base = w if w in results.get(peer, {}) else "augment"
            other = results.get(peer, {}).get(base)
            if other is None:
                continue
            ratio = other["seconds"] / fl[w]["seconds"]
            line = f"frostline {w} vs {peer} {base}: {ratio:.2f}x"
            if other.get("cpu_seconds") and fl[w].get("cpu_seconds"):
                # on a shared machine the CPU time each peer used is the steadier measure
                line += f" (CPU time: {other['cpu_seconds'] / fl[w]['cpu_seconds']:.2f}x)"
            lines.append(line)
    if "torch" in results:
        for w, target in TARGETS.items():
            if w not in fl or w not in results["torch"]:
                continue
            loop = results["torch"][w]
            s = loop["seconds"] / fl[w]["seconds"]
            line = f"target {w} >= {target:g}x the savvy loop: {s:.2f}x {'MET' if s >= target else 'MISSED'}"
            if fl[w].get("peak_mb") and loop.get("peak_mb"):
                m = fl[w]["peak_mb"] / loop["peak_mb"]
                line += f"; peak memory {m:.2f} of the loop (<= 1.02) {'MET' if m <= 1.02 else 'MISSED'}"
            lines.append(line)
    nocache = results.get("frostline_nocache", {})
    for w in workloads:
        if w in fl and w in nocache and fl[w].get("losses") and nocache[w].get("losses"):
            a, b = np.array(fl[w]["losses"]), np.array(nocache[w]["losses"])
            same = a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=1e-6))
            lines.append(f"losses {w} equal cache=False: {'yes' if same else 'NO'}")
    if args.quick or cuda:
        lines.append("(targets are for the default CPU workload)")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--quick`` is a tiny smoke run.

    >>> a = parse_args([])
    >>> (a.images, a.size, a.epochs, a.batch_size, a.views, a.peer_list)
    (1000, 64, 5, 64, 2, ['frostline', 'torch', 'keras'])
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--peers", default=None, help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="augment,dropout")
    p.add_argument("--images", type=int, default=None, help="digits, 80%% trained (default 1000)")
    p.add_argument("--size", type=int, default=None, help="image side (default 64; 224 on cuda)")
    p.add_argument("--epochs", type=int, default=None, help="default 5")
    p.add_argument("--batch-size", type=int, default=None, help="default 64")
    p.add_argument("--views", type=int, default=2, help="augment_views row (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch / TF threads (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="interleaved runs; fastest kept")
    p.add_argument("--quick", action="store_true", help="smoke test (48 images at 32 px)")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    quick = {"images": 48, "size": 32, "epochs": 2, "batch_size": 16}
    full = {"images": 1000, "size": 224 if cuda else 64, "epochs": 5, "batch_size": 64}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.peers is None:
        args.peers = "frostline,torch" if cuda else "frostline,torch,keras"
    args.peer_list = [s.strip() for s in args.peers.split(",") if s.strip()]
    args.workload_list = [s.strip() for s in args.workloads.split(",") if s.strip()]
    if set(args.peer_list) - set(PEERS):
        p.error(f"unknown peer(s) {sorted(set(args.peer_list) - set(PEERS))}; choose from {PEERS}")
    if not args.workload_list or set(args.workload_list) - set(WORKLOADS):
        p.error(f"--workloads: choose from {','.join(WORKLOADS)}, got {args.workloads!r}")
    if cuda and "keras" in args.peer_list:
        p.error("the cuda path compares the torch peers (tensorflow-cpu has no GPU)")
    if min(args.images, args.epochs, args.repeat, args.batch_size) < 1 or args.views < 0:
        p.error("--images, --epochs, --batch-size and --repeat must be >= 1, --views >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        result["peak_rss_mb"] = maxrss_mb()
        Path(args.result).write_text(json.dumps(result))
        return 0
    if not device_available(args.device):
        return 2
    load = os.getloadavg()
    print(
        f"the Keras guide's model: {args.images} digits at {args.size} px, batch "
        f"{args.batch_size}, {args.epochs} epochs, {args.threads} threads, device {args.device}; "
        f"load average {load[0]:.2f}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {peer: [] for peer in args.peer_list}
    for rep in range(args.repeat):
        for peer in args.peer_list:
            t0 = time.perf_counter()
            r = _run_peer(peer, args)
            runs[peer].append(r)
            took = ", ".join(f"{p['workload']} {p['seconds']:.2f} s" for p in r["phases"])
            print(
                f"  [{rep + 1}/{args.repeat}] {peer}: {took} "
                f"({time.perf_counter() - t0:.0f} s in all, load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    results = {peer: best(rs) for peer, rs in runs.items()}
    lines = report(results, args)
    print("\n" + "\n".join(lines))
    after = os.getloadavg()
    print(f"\nload average before/after: {load[0]:.2f} / {after[0]:.2f}")
    for peer, rs in runs.items():
        print(f"{peer}: " + ", ".join(f"{k} {v}" for k, v in rs[0]["versions"].items()))
    if args.json_out:
        write_json(args.json_out, args, load=[load, after], results=results, runs=runs, table=lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
