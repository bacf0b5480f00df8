"""Two-phase transfer learning, side by side: frostline vs hand-written PyTorch vs Keras 3.

The workload (the seeds' two-phase example) on CPU:

* MobileNetV2 (timm ``mobilenetv2_100`` / ``keras.applications.MobileNetV2``), random
  weights, pooled 1280 features, 96x96 RGB inputs made from scikit-learn's digits
  (8x8 -> 96x96 bilinear, grey -> RGB, 1797 images repeated to ``--images``), 10 classes;
* phase 1: the base frozen, a new Dense/Linear head, ``--epochs1`` epochs, Adam 1e-3,
  batch 64;
* phase 2: the last 10 leaf layers of the base (modules/layers owning weights)
  unfrozen, ``--epochs2`` epochs, Adam 1e-5.

Every peer runs in its own subprocess (so peak RSS is per peer; ``ru_maxrss`` and the
``VmHWM`` of each phase, which is reset between phases through
``/proc/self/clear_refs`` where the kernel allows it), with the same number of threads.
Phase times are wall clock around everything a user would run for that phase
(``compile`` + ``fit``, or building the optimizer + the loop), first-call costs
included; model construction and data loading are reported separately as setup.

``--device cuda`` runs ResNet-50 (timm ``resnet50``) at 224x224, batch 128, bf16
autocast, channels_last, the data already on the GPU, phase 2 = ``layer4`` + head
trainable, and reports images/second per phase (frostline vs the hand-written loop).

Run ``python benchmarks/two_phase.py --help``; see benchmarks/README.md for results.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
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

# measure.py lies beside this script: found when it runs and when a test loads it by path.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import Phase, device_available, machine_info, maxrss_mb, write_json  # noqa: E402

PEERS = ("frostline", "torch", "keras")
NUM_CLASSES = 10
UNFREEZE_LAST = 10
PHASE1_LR = 1e-3
PHASE2_LR = 1e-5


# ----------------------------------------------------------------------------- data


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits as float32 in [0, 16] and int64 labels.

    Read straight from the CSV that ships with scikit-learn, so that no peer pays for
    importing scikit-learn/scipy (it would count in its peak RSS).
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
        if path.exists():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",", dtype=np.float32)
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix of bilinear resampling, as ``F.interpolate(align_corners=False)``."""
    a = np.zeros((dst, src), dtype=np.float32)
    for i in range(dst):
        pos = max((i + 0.5) * src / dst - 0.5, 0.0)
        lo = min(int(pos), src - 1)
        hi = min(lo + 1, src - 1)
        w = pos - lo
        a[i, lo] += 1.0 - w
        a[i, hi] += w
    return a


def make_data(n: int, size: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digit images upscaled to ``size`` x ``size`` RGB in [-1, 1], NCHW or NHWC.

    The 1797 digits are repeated in order when ``n`` is larger (no augmentation).
    Filled chunk by chunk so the only large allocation is the result itself.
    """
    images, labels = _digits()
    order = np.arange(n) % len(images)
    a = _bilinear_matrix(8, size)
    shape = (n, 3, size, size) if layout == "NCHW" else (n, size, size, 3)
    out = np.empty(shape, dtype=np.float32)
    for start in range(0, n, 256):
        sel = order[start : start + 256]
        grey = np.einsum("ij,njk,lk->nil", a, images[sel], a) / 8.0 - 1.0  # [0, 16] -> [-1, 1]
        for c in range(3):
            if layout == "NCHW":
                out[start : start + len(sel), c] = grey
            else:
                out[start : start + len(sel), ..., c] = grey
    return out, labels[order]


# ---------------------------------------------------------------------------- peers


def _torch_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set by an earlier parallel region
        torch.set_num_interop_threads(threads)
    return torch


def _torch_versions() -> dict[str, str]:
    import timm
    import torch

    return {"torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__}


def run_frostline(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch_setup(args.threads)
    from torch import nn

    import frostline as fl

    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    x, y, arch, features = _torch_workload(args)
    torch.manual_seed(0)
    base = fl.models.pretrained(arch, pretrained=False, headless=True)
    model = fl.Sequential([base, nn.Linear(features, NUM_CLASSES)])
    compile_kw: dict[str, Any] = {"device": args.device}
    if cuda:
        model.module.to("cuda", memory_format=torch.channels_last)
        compile_kw["precision"] = "bf16"
    setup = time.perf_counter() - t0
    loss = "sparse_categorical_crossentropy"

    def fit(epochs: int) -> dict[str, Any]:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # the epoch log says what the cache did
            h = model.fit(x, y, batch_size=args.batch_size, epochs=epochs, verbose=2, seed=0)
        notes = re.findall(r"cache: (.*)$", log.getvalue(), flags=re.MULTILINE)
        boundary = re.search(r"after '([^']*)'", notes[-1]) if notes else None
        return {
            "loss": h.history["loss"][-1],
            "accuracy": h.history["accuracy"][-1],
            "trainable_params": sum(p.numel() for p in model.trainable_weights),
            "boundary": boundary.group(1) if boundary else None,
            "cache": notes[-1].strip() if notes else None,
        }

    phases = []
    with Phase(cuda) as p1:
        base.trainable = False
        model.compile(
            optimizer=fl.optimizers.Adam(PHASE1_LR), loss=loss, metrics=["accuracy"], **compile_kw
        )
        info1 = fit(args.epochs1)
    phases.append({"seconds": p1.seconds, "peak_mb": p1.peak_mb, **info1})
    with Phase(cuda) as p2:
        if cuda:
            base.unfreeze(fl.select.name("layer4"))
        else:
            base.unfreeze(fl.select.last(UNFREEZE_LAST))
        model.compile(
            optimizer=fl.optimizers.Adam(PHASE2_LR), loss=loss, metrics=["accuracy"], **compile_kw
        )
        info2 = fit(args.epochs2)
    phases.append({"seconds": p2.seconds, "peak_mb": p2.peak_mb, **info2})
    versions = {**_torch_versions(), "frostline": fl.__version__}
    return {"setup_s": setup, "phases": phases, "versions": versions}


def _leaf_modules(module) -> list:
    """Modules that own weights (parameters or float buffers), in registration order."""
    out = []
    for m in module.modules():
        own = list(m.parameters(recurse=False)) + [
            b for b in m.buffers(recurse=False) if b is not None and b.is_floating_point()
        ]
        if own:
            out.append(m)
    return out


def run_torch(args: argparse.Namespace) -> dict[str, Any]:
    """The idiomatic hand-written loop: requires_grad_(False), eval base, head optimizer."""
    torch = _torch_setup(args.threads)
    import timm
    import torch.nn.functional as F
    from torch import nn

    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    x, y, arch, features = _torch_workload(args)
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, num_classes=0)
    head = nn.Linear(features, NUM_CLASSES)
    device = torch.device(args.device)
    base.to(device)
    head.to(device)
    if cuda:
        base.to(memory_format=torch.channels_last)
    setup = time.perf_counter() - t0
    n = x.shape[0]
    bs = args.batch_size

    def autocast():
        if cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(optimizer, epochs: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(0)
        loss_sum = correct = seen = 0.0
        for _ in range(epochs):
            loss_sum = correct = seen = 0.0
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                if cuda:
                    idx = idx.to(device, non_blocking=True)
                xb, yb = x[idx], y[idx]
                with autocast():
                    out = head(base(xb))
                    loss = F.cross_entropy(out.float(), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += float((out.argmax(1) == yb).sum())
                seen += len(idx)
        params = [p for p in list(base.parameters()) + list(head.parameters()) if p.requires_grad]
        return {
            "loss": loss_sum / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "trainable_params": sum(p.numel() for p in params),
        }

    phases = []
    with Phase(cuda) as p1:
        base.requires_grad_(False)
        base.eval()
        head.train()
        info1 = train(torch.optim.Adam(head.parameters(), lr=PHASE1_LR), args.epochs1)
    phases.append({"seconds": p1.seconds, "peak_mb": p1.peak_mb, **info1})
    with Phase(cuda) as p2:
        unfrozen = [base.layer4] if cuda else _leaf_modules(base)[-UNFREEZE_LAST:]
        for m in unfrozen:
            m.requires_grad_(True)
        base.train()
        for m in base.modules():  # BatchNorm of frozen layers stays on running statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters()
            ):
                m.eval()
        params = [p for p in list(base.parameters()) + list(head.parameters()) if p.requires_grad]
        info2 = train(torch.optim.Adam(params, lr=PHASE2_LR), args.epochs2)
    phases.append({"seconds": p2.seconds, "peak_mb": p2.peak_mb, **info2})
    return {"setup_s": setup, "phases": phases, "versions": _torch_versions()}


def run_keras(args: argparse.Namespace) -> dict[str, Any]:
    """Keras 3 on TensorFlow, with the recompile the seeds prescribe after the unfreeze."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    t0 = time.perf_counter()
    x, y = make_data(args.images, args.size, "NHWC")
    keras.utils.set_random_seed(0)
    shape = (args.size, args.size, 3)
    base = keras.applications.MobileNetV2(
        weights=None, include_top=False, pooling="avg", input_shape=shape
    )
    model = keras.Sequential([keras.Input(shape), base, keras.layers.Dense(NUM_CLASSES)])
    setup = time.perf_counter() - t0
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def fit(epochs: int) -> dict[str, Any]:
        h = model.fit(x, y, batch_size=args.batch_size, epochs=epochs, verbose=0, shuffle=True)
        return {
            "loss": float(h.history["loss"][-1]),
            "accuracy": float(h.history["accuracy"][-1]),
            "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        }

    phases = []
    with Phase(False) as p1:
        base.trainable = False
        model.compile(optimizer=keras.optimizers.Adam(PHASE1_LR), loss=loss, metrics=["accuracy"])
        info1 = fit(args.epochs1)
    phases.append({"seconds": p1.seconds, "peak_mb": p1.peak_mb, **info1})
    with Phase(False) as p2:
        # Keras 3: a layer inside a non-trainable model reports no trainable weights, so
        # unfreeze the base and freeze all but its last 10 layers that hold weights.
        base.trainable = True
        weighted = [layer for layer in base.layers if layer.weights]
        for layer in weighted[:-UNFREEZE_LAST]:
            layer.trainable = False
        model.compile(optimizer=keras.optimizers.Adam(PHASE2_LR), loss=loss, metrics=["accuracy"])
        info2 = fit(args.epochs2)
    phases.append({"seconds": p2.seconds, "peak_mb": p2.peak_mb, **info2})
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}
    return {"setup_s": setup, "phases": phases, "versions": versions}


def _torch_workload(args: argparse.Namespace):
    """The torch peers' data, timm architecture and its feature width for ``--device``.

    CPU: the digits at ``--size`` (NCHW) for MobileNetV2; CUDA: the digits on the GPU,
    channels_last, for ResNet-50.
    """
    import torch

    xn, yn = make_data(args.images, args.size, "NCHW")
    if args.device != "cuda":
        return torch.from_numpy(xn), torch.from_numpy(yn), "mobilenetv2_100", 1280
    x = torch.from_numpy(xn).to("cuda").contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(yn).to("cuda")
    del xn
    return x, y, "resnet50", 2048


WORKERS = {"frostline": run_frostline, "torch": run_torch, "keras": run_keras}


def _worker(args: argparse.Namespace) -> None:
    result = WORKERS[args.worker](args)
    result["peak_rss_mb"] = maxrss_mb()
    result["threads"] = args.threads
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


def _run_peer(peer: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="two-phase-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", peer, "--result", str(out)]
        cmd += ["--device", args.device, "--images", str(args.images), "--size", str(args.size)]
        cmd += ["--epochs1", str(args.epochs1), "--epochs2", str(args.epochs2)]
        cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(args.threads)
        env["TF_NUM_INTRAOP_THREADS"] = env["TF_NUM_INTEROP_THREADS"] = str(args.threads)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"peer {peer!r} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
    result["process_s"] = wall
    return result


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase, the fastest of the repeats (timings on a shared machine only get slower)."""
    best = json.loads(json.dumps(runs[0]))
    for i in range(len(best["phases"])):
        fastest = min(runs, key=lambda r: r["phases"][i]["seconds"])
        best["phases"][i] = fastest["phases"][i]
        best["phases"][i]["all_seconds"] = [r["phases"][i]["seconds"] for r in runs]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The comparison table (markdown) plus target checks."""
    cuda = args.device == "cuda"
    lines = []
    if cuda:
        head = "| peer | phase 1 s | phase 1 img/s | phase 2 s | phase 2 img/s | peak GPU MB (p1 / p2) |"
        lines += [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    else:
        head = "| peer | setup s | phase 1 s | phase 2 s | total s | peak RSS MB | peak RSS MB p1 / p2 | final loss p1 / p2 |"
        lines += [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for peer, r in results.items():
        p1, p2 = r["phases"]
        if cuda:
            ips1 = args.images * args.epochs1 / p1["seconds"]
            ips2 = args.images * args.epochs2 / p2["seconds"]
            lines.append(
                f"| {peer} | {p1['seconds']:.2f} | {ips1:.0f} | {p2['seconds']:.2f} | {ips2:.0f} "
                f"| {_fmt(p1['peak_mb'], '.0f')} / {_fmt(p2['peak_mb'], '.0f')} |"
            )
        else:
            total = p1["seconds"] + p2["seconds"]
            lines.append(
                f"| {peer} | {r['setup_s']:.1f} | {p1['seconds']:.2f} | {p2['seconds']:.2f} | {total:.2f} "
                f"| {r['peak_rss_mb']:.0f} | {_fmt(p1['peak_mb'], '.0f')} / {_fmt(p2['peak_mb'], '.0f')} "
                f"| {p1['loss']:.3f} / {p2['loss']:.3f} |"
            )
    fl = results.get("frostline")
    if fl is not None and len(results) > 1:
        lines += [
            "",
            "| frostline vs | phase 1 speed-up | phase 2 speed-up | total speed-up | peak memory frostline/peer |",
        ]
        lines += ["| --- | ---: | ---: | ---: | ---: |"]
        f1, f2 = (p["seconds"] for p in fl["phases"])
        for peer, r in results.items():
            if peer == "frostline":
                continue
            q1, q2 = (p["seconds"] for p in r["phases"])
            if cuda:
                mem = max(fl["phases"][i]["peak_mb"] or 0 for i in (0, 1)) / max(
                    max(r["phases"][i]["peak_mb"] or 0 for i in (0, 1)), 1e-9
                )
            else:
                mem = fl["peak_rss_mb"] / r["peak_rss_mb"]
            lines.append(
                f"| {peer} | {q1 / f1:.2f}x | {q2 / f2:.2f}x | {(q1 + q2) / (f1 + f2):.2f}x | {mem:.2f} |"
            )
        if args.quick:
            lines += ["", "(--quick is a smoke test: the targets are for the default workload)"]
        elif not cuda:
            lines += ["", *_targets(results)]
    return lines


def _targets(results: dict[str, dict[str, Any]]) -> list[str]:
    fl = results["frostline"]
    f1, f2 = (p["seconds"] for p in fl["phases"])
    out = []
    for peer in ("torch", "keras"):
        if peer in results:
            s = results[peer]["phases"][0]["seconds"] / f1
            out.append(
                f"target phase 1 >= 5x faster than {peer}: {s:.2f}x {'MET' if s >= 5 else 'MISSED'}"
            )
    if "torch" in results:
        t = results["torch"]
        s = t["phases"][1]["seconds"] / f2
        out.append(
            f"target phase 2 >= 1.5x faster than torch: {s:.2f}x {'MET' if s >= 1.5 else 'MISSED'}"
        )
        m = fl["peak_rss_mb"] / t["peak_rss_mb"]
        ok = fl["peak_rss_mb"] <= t["peak_rss_mb"]
        out.append(
            f"target peak RSS <= torch: {fl['peak_rss_mb']:.0f} vs {t['peak_rss_mb']:.0f} MB "
            f"({m:.2f}) {'MET' if ok else 'MISSED'}"
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--peers", default=None, help="comma-separated subset of frostline,torch,keras")
    p.add_argument("--images", type=int, default=None, help="training images (default 2000)")
    p.add_argument("--size", type=int, default=None, help="image side (default 96; 224 on cuda)")
    p.add_argument("--epochs1", type=int, default=None, help="phase 1 epochs (default 10)")
    p.add_argument("--epochs2", type=int, default=None, help="phase 2 epochs (default 3)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64; 128 on cuda")
    p.add_argument("--threads", type=int, default=2, help="torch / TF threads (default 2)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per peer, interleaved; the fastest per phase is reported",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke test (128 images at 32x32, 2+1 epochs)"
    )
    p.add_argument("--json", dest="json_out", default=None, help="write all results to this file")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    quick = {"images": 128, "size": 32, "epochs1": 2, "epochs2": 1, "batch_size": 32}
    full = {"images": 2000, "size": 224 if cuda else 96, "epochs1": 10, "epochs2": 3}
    full["batch_size"] = 128 if cuda else 64
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.peers is None:
        args.peers = "frostline,torch" if cuda else ",".join(PEERS)
    args.peer_list = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = set(args.peer_list) - set(PEERS)
    if unknown:
        p.error(f"unknown peer(s) {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if cuda and "keras" in args.peer_list:
        p.error(
            "the cuda path compares frostline with the hand-written loop (tensorflow-cpu has no GPU)"
        )
    if args.images < 1 or args.epochs1 < 1 or args.epochs2 < 1 or args.repeat < 1:
        p.error("--images, --epochs1, --epochs2 and --repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if not device_available(args.device):
        return 2
    load_before = os.getloadavg()
    what = "ResNet-50 224px bf16 channels_last" if args.device == "cuda" else "MobileNetV2"
    print(
        f"two-phase transfer learning: {what}, {args.images} images at {args.size}x{args.size}, "
        f"batch {args.batch_size}, {args.epochs1}+{args.epochs2} epochs, {args.threads} threads, "
        f"device {args.device}; load average {load_before[0]:.2f}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {peer: [] for peer in args.peer_list}
    for rep in range(args.repeat):
        for peer in args.peer_list:
            r = _run_peer(peer, args)
            runs[peer].append(r)
            p1, p2 = r["phases"]
            print(
                f"  [{rep + 1}/{args.repeat}] {peer:9s} phase 1 {p1['seconds']:7.2f} s  "
                f"phase 2 {p2['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                f"(load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    results = {peer: _best(rs) for peer, rs in runs.items()}
    load_after = os.getloadavg()
    lines = report(results, args)
    print()
    print("\n".join(lines))
    print(
        f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} ({machine_info()['cores']} cores)"
    )
    for peer, r in results.items():
        notes = [
            f"trainable params p1/p2 {r['phases'][0]['trainable_params']:,}/{r['phases'][1]['trainable_params']:,}"
        ]
        if "cache" in r["phases"][0]:
            notes.append(
                f"boundary p1 {r['phases'][0]['boundary']!r}, p2 {r['phases'][1]['boundary']!r}"
            )
        print(
            f"{peer}: "
            + "; ".join(notes)
            + "; "
            + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        )
    if args.json_out:
        write_json(
            args.json_out,
            args,
            load_before=load_before,
            load_after=load_after,
            results=results,
            runs=runs,
            table=lines,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
