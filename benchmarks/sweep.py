"""Architecture sweep: does freezing pay on models nobody tuned frostline for?

For each architecture (timm, torchvision, Hugging Face transformers; random init, tiny
configs and small inputs on CPU, nothing downloaded) two transfer-learning phases are
timed for frostline and for a hand-written PyTorch loop, on the same weights, data,
batch order, batch size, optimizer and number of epochs:

* phase 1: the backbone frozen, only the classification head trains (``--epochs1``,
  default 10, Adam 1e-3);
* phase 2: the backbone's last block unfrozen as well (``--epochs2``, default 3,
  Adam 1e-4), continuing from phase 1's weights.

frostline: ``fl.wrap(net)``, ``get_layer(backbone).trainable = False``, ``compile`` +
``fit`` (defaults: ``cache="auto"``, ``verify_frozen=True``); phase 2
``get_layer(last_block).trainable = True``, ``compile``, ``fit``.

The loop, as a competent user writes it: ``requires_grad_(False)`` on the frozen
parameters, ``torch.optim.Adam`` (eps 1e-7, as ``fl.optimizers.Adam``) over the
trainable parameters only, ``model.train()`` each epoch with the BatchNorm layers of
frozen blocks put back in eval mode (the fine-tuning guides' advice, and what
frostline does), no caching; phase 2 builds a new optimizer over the new trainable set.
Its Adam runs torch's default kernel (per tensor, on CPU); frostline's ``TorchOptimizer``
runs torch's fused kernel, the same update in one pass. ``--loop-fused`` gives the loop the
fused kernel too, to separate what freezing buys from what the kernel buys.

Both peers see the batches in the same order (``shuffle=False``; the data is already in
random order), so their losses agree up to floating-point differences (and dropout's
random draws where a model has dropout).

Each (architecture, peer) runs in a fresh subprocess, so the numbers are comparable:
phase times are wall clock around what a user runs for the phase (``compile`` + ``fit``,
or building the optimizer + the loop), first-call costs included; peak memory per phase
is the process's RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
before each phase; on CUDA ``torch.cuda.max_memory_allocated``). Both peers import the
same libraries (torch, timm, torchvision, transformers; frostline adds ~2 MB).

``--device cuda --precision bf16 --image-size 224 --batch-size 128`` runs the same sweep
on a GPU (full-size configs, ResNet-50 and ViT-B/16 included; images/s reported).

Run ``python benchmarks/sweep.py --help``; see benchmarks/README.md for results.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# measure.py lies beside this script: found when it runs and when a test loads it by path.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import Phase, device_available, machine_info, maxrss_mb, write_json  # noqa: E402

NUM_CLASSES = 10
PHASE1_LR = 1e-3
PHASE2_LR = 1e-4
PEERS = ("loop", "frostline")
# Targets of issue #11 on the 2-core CPU machine.
TARGET_P1 = 3.0
TARGET_P2 = 1.3
# Peak memory may exceed the loop's by allocator noise only.
MEM_SLACK_MB = 8.0
MEM_SLACK_FRAC = 0.02


# --------------------------------------------------------------------------- phases


def _phase_result(p: Phase, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "seconds": p.seconds,
        "cpu_seconds": p.cpu_seconds,
        "peak_mb": p.peak_mb,
        "start_mb": p.start_mb,
        **info,
    }


def _run_phases(cuda: bool, phases: list[Callable[[], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run the phases in order, each timed; a failing phase is recorded and ends the run."""
    import traceback

    out = []
    for run in phases:
        try:
            with Phase(cuda) as p:
                info = run()
        except Exception as e:
            tail = traceback.format_exc().strip().splitlines()
            out.append({"error": f"{type(e).__name__}: {e}"[:300], "traceback": tail[-12:]})
            break
        out.append(_phase_result(p, info))
    return out


# ---------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, what is frozen and what phase 2 unfreezes.

    ``build(args)`` returns the full classifier as one ``nn.Module``; ``backbone`` and
    ``last_block`` are dotted submodule paths in it (frozen in phase 1; unfrozen again
    in phase 2). ``kind`` is ``"image"`` (float NCHW) or ``"tokens"`` (``input_ids`` +
    ``attention_mask``).
    """

    name: str
    library: str
    kind: str
    build: Callable[[argparse.Namespace], Any]
    backbone: str
    last_block: str
    cpu_default: bool = True


def _with_head(base, features: int):
    """``nn.Sequential(headless_base, Linear(features, 10))``: backbone ``0``, head ``1``."""
    from torch import nn

    return nn.Sequential(base, nn.Linear(features, NUM_CLASSES))


def _timm(name: str, **kwargs) -> Callable[[argparse.Namespace], Any]:
    def build(args: argparse.Namespace):
        import timm

        base = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        # MobileNetV3's pooled features go through conv_head: head_hidden_size, not num_features.
        return _with_head(base, getattr(base, "head_hidden_size", None) or base.num_features)

    return build


def _timm_vit(name: str) -> Callable[[argparse.Namespace], Any]:
    def build(args: argparse.Namespace):
        import timm

        kw: dict[str, Any] = {"img_size": args.image_size}
        if args.scale == "tiny":  # 4x4 patches + class token, 4 blocks
            kw.update(patch_size=max(args.image_size // 4, 1), depth=4)
        base = timm.create_model(name, pretrained=False, num_classes=0, **kw)
        return _with_head(base, base.num_features)

    return build


def _tv(name: str, head_attr: str, features: int, pool: bool = False):
    def build(args: argparse.Namespace):
        import torchvision
        from torch import nn

        base = getattr(torchvision.models, name)(weights=None)
        # Headless, as a transfer-learning user makes it: the classifier becomes a pass-through.
        setattr(base, head_attr, nn.AdaptiveAvgPool2d(1) if pool else nn.Identity())
        return _with_head(base, features)

    return build


def _hf_bert(args: argparse.Namespace):
    from transformers import BertConfig, BertForSequenceClassification

    if args.scale == "tiny":
        cfg = BertConfig(
            vocab_size=args.vocab,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=max(64, args.seq_len),
            num_labels=NUM_CLASSES,
        )
    else:  # bert-base sized
        cfg = BertConfig(vocab_size=args.vocab, num_labels=NUM_CLASSES)
    return BertForSequenceClassification(cfg)


def _hf_gpt2(args: argparse.Namespace):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    # A classifier has no use for the key/value cache (use_cache=True would return it next
    # to the logits); bos/eos inside the small vocabulary, padding with id 0.
    end = args.vocab - 1
    common = dict(num_labels=NUM_CLASSES, pad_token_id=0, use_cache=False)
    common.update(bos_token_id=end, eos_token_id=end)
    if args.scale == "tiny":
        cfg = GPT2Config(
            vocab_size=args.vocab,
            n_embd=128,
            n_layer=4,
            n_head=4,
            n_positions=max(64, args.seq_len),
            **common,
        )
    else:  # GPT-2 small sized
        cfg = GPT2Config(vocab_size=args.vocab, **common)
    return GPT2ForSequenceClassification(cfg)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch(
            "timm_vit_tiny", "timm", "image", _timm_vit("vit_tiny_patch16_224"), "0", "0.blocks.-1"
        ),
        Arch(
            "timm_deit_tiny",
            "timm",
            "image",
            _timm_vit("deit_tiny_patch16_224"),
            "0",
            "0.blocks.-1",
        ),
        Arch(
            "timm_convnext_atto",
            "timm",
            "image",
            _timm("convnext_atto"),
            "0",
            "0.stages.3.blocks.1",
        ),
        Arch(
            "timm_mobilenetv3", "timm", "image", _timm("mobilenetv3_small_100"), "0", "0.blocks.4.2"
        ),
        Arch("timm_regnetx_002", "timm", "image", _timm("regnetx_002"), "0", "0.s4.b7"),
        Arch("timm_resnet18", "timm", "image", _timm("resnet18"), "0", "0.layer4.1"),
        Arch(
            "timm_efficientnet_b0", "timm", "image", _timm("efficientnet_b0"), "0", "0.blocks.6.0"
        ),
        Arch("tv_resnet18", "torchvision", "image", _tv("resnet18", "fc", 512), "0", "0.layer4.1"),
        Arch(
            "tv_mobilenet_v3_small",
            "torchvision",
            "image",
            _tv("mobilenet_v3_small", "classifier", 576),
            "0",
            "0.features.11",
        ),
        Arch(
            "tv_efficientnet_b0",
            "torchvision",
            "image",
            _tv("efficientnet_b0", "classifier", 1280),
            "0",
            "0.features.7.0",
        ),
        Arch(
            "tv_densenet121",
            "torchvision",
            "image",
            _tv("densenet121", "classifier", 1024),
            "0",
            "0.features.denseblock4.denselayer16",
        ),
        Arch(
            "tv_squeezenet1_1",
            "torchvision",
            "image",
            _tv("squeezenet1_1", "classifier", 512, pool=True),
            "0",
            "0.features.12",
        ),
        Arch("hf_bert", "transformers", "tokens", _hf_bert, "bert", "bert.encoder.layer.-1"),
        Arch("hf_gpt2", "transformers", "tokens", _hf_gpt2, "transformer", "transformer.h.-1"),
        # Full-size references for the GPU run (too slow for the 2-core CPU default).
        Arch("timm_resnet50", "timm", "image", _timm("resnet50"), "0", "0.layer4.2", False),
        Arch(
            "timm_vit_base_patch16",
            "timm",
            "image",
            _timm_vit("vit_base_patch16_224"),
            "0",
            "0.blocks.-1",
            False,
        ),
    ]
}


def resolve_path(module, path: str) -> str:
    """A dotted path with negative indices (``blocks.-1``) as ``get_submodule`` names it."""
    parts = []
    current = module
    for part in path.split("."):
        if part.lstrip("-").isdigit() and int(part) < 0:
            names = [name for name, _ in current.named_children()]
            part = names[int(part)]
        current = current.get_submodule(part)
        parts.append(part)
    return ".".join(parts)


# ----------------------------------------------------------------------------- data


def make_data(arch: Arch, args: argparse.Namespace):
    """``args.samples`` learnable samples of 10 classes (inputs, int64 labels), in random order.

    Images: a fixed random pattern per class plus noise. Tokens: random ids, a third of
    them replaced by one of the class's five marker ids, random lengths right-padded
    with id 0 and an ``attention_mask``.
    """
    import torch

    g = torch.Generator().manual_seed(1234)
    n = args.samples
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    if arch.kind == "image":
        s = args.image_size
        protos = torch.randn(NUM_CLASSES, 3, s, s, generator=g)
        x = 0.6 * protos[y] + torch.randn(n, 3, s, s, generator=g)
        return x, y
    L, vocab = args.seq_len, args.vocab
    ids = torch.randint(NUM_CLASSES * 5 + 1, vocab, (n, L), generator=g)
    markers = 1 + y[:, None] * 5 + torch.randint(0, 5, (n, L), generator=g)
    ids = torch.where(torch.rand(n, L, generator=g) < 0.33, markers, ids)
    lengths = torch.randint(L // 4, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0 after each sequence's length
    return {"input_ids": ids, "attention_mask": mask}, y


# ---------------------------------------------------------------------------- peers


def _setup_torch(args: argparse.Namespace):
    import torch

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # already set by an earlier parallel region
        torch.set_num_interop_threads(args.threads)
    # Both peers import the same libraries, so their baseline RSS is the same.
    import timm  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401

    return torch


def _to_device(x, device, channels_last: bool):
    import torch

    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _build(arch: Arch, args: argparse.Namespace):
    import torch

    torch.manual_seed(0)
    net = arch.build(args)
    device = torch.device(args.device)
    net.to(device)
    if args.device == "cuda" and arch.kind == "image":
        net.to(memory_format=torch.channels_last)
    x, y = make_data(arch, args)
    x, y = _to_device(x, device, args.device == "cuda" and arch.kind == "image"), y.to(device)
    return net, x, y


def _versions() -> dict[str, str]:
    import numpy
    import timm
    import torch
    import torchvision
    import transformers

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def _count(params) -> int:
    return sum(p.numel() for p in params)


_CACHE_NOTE = re.compile(r"cache: (.*)$")


def _cache_notes(log: str) -> list[str]:
    """The ``cache: ...`` note of every epoch line in a ``verbose=2`` log."""
    notes = []
    for line in log.splitlines():
        m = _CACHE_NOTE.search(line)
        if m:
            notes.append(m.group(1).strip())
    return notes


def run_frostline(arch: Arch, args: argparse.Namespace) -> dict[str, Any]:
    torch = _setup_torch(args)
    import frostline as fl

    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    net, x, y = _build(arch, args)
    model = fl.wrap(net)
    backbone = resolve_path(net, arch.backbone)
    last_block = resolve_path(net, arch.last_block)
    compile_kw: dict[str, Any] = {"device": args.device}
    if args.precision != "fp32":
        compile_kw["precision"] = args.precision
    fit_kw: dict[str, Any] = {}
    if args.frozen_inference:
        fit_kw["frozen_inference"] = True
    setup = time.perf_counter() - t0

    def fit(epochs: int, **extra: Any) -> dict[str, Any]:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            h = model.fit(
                x,
                y,
                batch_size=args.batch_size,
                epochs=epochs,
                shuffle=False,
                verbose=2,
                seed=0,
                **fit_kw,
                **extra,
            )
        notes = _cache_notes(log.getvalue())
        return {
            "loss": float(h.history["loss"][-1]),
            "losses": [float(v) for v in h.history["loss"]],
            "trainable_params": _count(model.trainable_weights),
            "cache_first": notes[0] if notes else None,
            "cache_last": notes[-1] if notes else None,
        }

    def optimizer(lr: float):
        if args.optimizer == "keras":
            return fl.optimizers.Adam(lr)  # Keras math (epsilon outside the bias correction)
        return fl.optimizers.TorchOptimizer(torch.optim.Adam, lr=lr)  # the loop's optimizer

    def phase1() -> dict[str, Any]:
        model.get_layer(backbone).trainable = False
        model.compile(optimizer(PHASE1_LR), loss="sparse_categorical_crossentropy", **compile_kw)
        if args.unfreeze_next:  # phase 1 knows what phase 2 unfreezes (as two_phase does)
            return fit(args.epochs1, unfreeze_next=model.get_layer(last_block))
        return fit(args.epochs1)

    def phase2() -> dict[str, Any]:
        model.get_layer(last_block).trainable = True
        model.compile(optimizer(PHASE2_LR), loss="sparse_categorical_crossentropy", **compile_kw)
        return fit(args.epochs2)

    phases = _run_phases(cuda, [phase1, phase2])
    return {
        "setup_s": setup,
        "phases": phases,
        "versions": {**_versions(), "frostline": fl.__version__},
    }


def run_loop(arch: Arch, args: argparse.Namespace) -> dict[str, Any]:
    """The hand-written loop a competent user writes (no caching)."""
    torch = _setup_torch(args)
    import torch.nn.functional as F
    from torch import nn

    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    net, x, y = _build(arch, args)
    backbone = net.get_submodule(resolve_path(net, arch.backbone))
    last_block = net.get_submodule(resolve_path(net, arch.last_block))
    n, bs = len(y), args.batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    setup = time.perf_counter() - t0

    def forward(xb):
        out = net(**xb) if isinstance(xb, dict) else net(xb)
        return out.logits if hasattr(out, "logits") else out

    def batch(i: int):
        if isinstance(x, dict):
            return {k: v[i : i + bs] for k, v in x.items()}
        return x[i : i + bs]

    def train(optimizer, epochs: int) -> dict[str, Any]:
        losses = []
        for _ in range(epochs):
            net.train()
            for m in net.modules():  # BatchNorm of frozen layers stays on running statistics
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters()
                ):
                    m.eval()
            if args.frozen_inference:
                for m in backbone.modules():
                    if not any(p.requires_grad for p in m.parameters()):
                        m.eval()
            total = torch.zeros(
                (), device=x["input_ids"].device if isinstance(x, dict) else x.device
            )
            for i in range(0, n, bs):
                xb, yb = batch(i), y[i : i + bs]
                with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
                    out = forward(xb)
                    loss = F.cross_entropy(out.float(), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(yb)
            losses.append(float(total) / n)
        params = [p for p in net.parameters() if p.requires_grad]
        return {"loss": losses[-1], "losses": losses, "trainable_params": _count(params)}

    # torch.optim.Adam as frostline runs it (--optimizer torch), or with Keras' epsilon.
    eps = 1e-7 if args.optimizer == "keras" else 1e-8
    kernel = {"fused": True} if args.loop_fused else {}  # torch's CPU default: per tensor

    def phase1() -> dict[str, Any]:
        backbone.requires_grad_(False)
        params = [p for p in net.parameters() if p.requires_grad]
        return train(torch.optim.Adam(params, lr=PHASE1_LR, eps=eps, **kernel), args.epochs1)

    def phase2() -> dict[str, Any]:
        last_block.requires_grad_(True)
        params = [p for p in net.parameters() if p.requires_grad]
        return train(torch.optim.Adam(params, lr=PHASE2_LR, eps=eps, **kernel), args.epochs2)

    phases = _run_phases(cuda, [phase1, phase2])
    return {"setup_s": setup, "phases": phases, "versions": _versions()}


WORKERS = {"frostline": run_frostline, "loop": run_loop}


def _worker(args: argparse.Namespace) -> None:
    result = WORKERS[args.worker](ARCHS[args.worker_arch], args)
    result["peak_rss_mb"] = maxrss_mb()
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


_FORWARD = (
    "device",
    "precision",
    "scale",
    "image_size",
    "seq_len",
    "vocab",
    "samples",
    "batch_size",
    "epochs1",
    "epochs2",
    "threads",
    "optimizer",
)


def _run_peer(arch: str, peer: str, args: argparse.Namespace) -> dict[str, Any]:
    """One (architecture, peer) in a fresh subprocess; an ``error`` entry if it failed."""
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", peer]
        cmd += ["--worker-arch", arch, "--result", str(out)]
        for key in _FORWARD:
            cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
        if args.frozen_inference:
            cmd.append("--frozen-inference")
        if args.loop_fused:
            cmd.append("--loop-fused")
        if args.unfreeze_next:
            cmd.append("--unfreeze-next")
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(args.threads)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()
            last = next((line for line in reversed(tail) if line.strip()), "")
            return {
                "error": f"exit {proc.returncode}: {last[:300]}",
                "log_tail": "\n".join(tail[-40:]),
                "process_s": wall,
            }
        result = json.loads(out.read_text())
    result["process_s"] = wall
    return result


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase, the fastest of the repeats (a shared machine only makes runs slower)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    best = json.loads(json.dumps(ok[0]))
    best["phases"] = []
    for i in range(max(len(r["phases"]) for r in ok)):
        done = [r["phases"][i] for r in ok if len(r["phases"]) > i]
        good = [p for p in done if "error" not in p]
        if not good:  # every repeat failed in this phase
            best["phases"].append(json.loads(json.dumps(done[0])))
            break
        fastest = json.loads(json.dumps(min(good, key=lambda p: p["seconds"])))
        fastest["all_seconds"] = [p["seconds"] for p in good]
        peaks = [p["peak_mb"] for p in good if p["peak_mb"] is not None]
        fastest["peak_mb"] = max(peaks) if peaks else None
        best["phases"].append(fastest)
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    return best


def _phase(result: dict[str, Any], i: int) -> dict[str, Any]:
    """Phase ``i`` of a peer's result, or an ``error`` entry saying why it has none."""
    if "error" in result:
        return {"error": result["error"]}
    if i < len(result.get("phases", [])):
        return result["phases"][i]
    return {"error": "not run: an earlier phase failed"}


def losses_agree(a: float, b: float, rtol: float = 0.05, atol: float = 0.05) -> bool:
    """Final losses of the two peers within tolerance (dropout draws differ between peers).

    >>> losses_agree(1.00, 1.03), losses_agree(1.0, 1.5), losses_agree(float("nan"), 1.0)
    (True, False, False)
    """
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def compare(
    results: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One row per (architecture, phase): times, speed-up, memory, losses, flags."""
    rows = []
    check_targets = args.device == "cpu" and not args.quick
    for arch, peers in results.items():
        loop, fl = peers.get("loop", {}), peers.get("frostline", {})
        for i, phase in enumerate((1, 2)):
            row: dict[str, Any] = {"arch": arch, "phase": phase, "flags": []}
            lp, fp = _phase(loop, i), _phase(fl, i)
            errors = [
                f"{p}: {r['error']}" for p, r in (("loop", lp), ("frostline", fp)) if "error" in r
            ]
            if errors:
                row["error"] = "; ".join(errors)
                row["flags"].append("ERROR")
                rows.append(row)
                continue
            row.update(
                loop_s=lp["seconds"],
                frostline_s=fp["seconds"],
                speedup=lp["seconds"] / fp["seconds"],
                cpu_speedup=_ratio(lp.get("cpu_seconds"), fp.get("cpu_seconds")),
                loop_mb=lp["peak_mb"],
                frostline_mb=fp["peak_mb"],
                loop_loss=lp["loss"],
                frostline_loss=fp["loss"],
                cache=fp.get("cache_last") or fp.get("cache_first") or "-",
                cache_first=fp.get("cache_first"),
                trainable_params=(lp["trainable_params"], fp["trainable_params"]),
            )
            if lp["trainable_params"] != fp["trainable_params"]:
                row["flags"].append("PARAMS")
            if not losses_agree(lp["loss"], fp["loss"]):
                row["flags"].append("LOSS")
            if check_targets:
                target = TARGET_P1 if phase == 1 else TARGET_P2
                if row["speedup"] < 1.0:
                    row["flags"].append("SLOWER")
                elif row["speedup"] < target:
                    row["flags"].append(f"<{target:g}x")
            lm, fm = lp["peak_mb"], fp["peak_mb"]
            if lm is not None and fm is not None and fm > lm * (1 + MEM_SLACK_FRAC) + MEM_SLACK_MB:
                row["flags"].append("MEM")
            rows.append(row)
    return rows


_NOTE = re.compile(r"^(\w+) \(\d+ samples after (.*), ([\d.]+ MB) in (\w+)\)(.*)$")


def short_cache(first: str | None, last: str | None) -> str:
    """The cache notes of a phase's first and last epoch, for a table cell.

    >>> short_cache("built (8 samples after 'a' + 'b', 0.1 MB in memory)",
    ...             "reused (8 samples after 'a' + 'b', 0.1 MB in memory)")
    "built -> reused: after 'a' + 'b' (0.1 MB in memory)"
    >>> short_cache(None, "reused (8 samples after 'a', 0.1 MB in disk) (frozen part in inference mode)")
    "reused: after 'a' (0.1 MB in disk) (frozen part in inference mode)"
    >>> short_cache("off (cache=False)", "off (cache=False)")
    'off (cache=False)'
    """
    notes = [n for n in (first, last) if n]
    if not notes:
        return "-"
    parsed = [_NOTE.match(n) for n in notes]
    if not all(parsed):
        return " -> ".join(dict.fromkeys(notes))
    states = " -> ".join(dict.fromkeys(m.group(1) for m in parsed if m))
    m = parsed[-1]
    assert m is not None
    names = m.group(2).split(" + ")
    where = " + ".join(names[:2]) + (f" + {len(names) - 2} more" if len(names) > 2 else "")
    return f"{states}: after {where} ({m.group(3)} in {m.group(4)}){m.group(5)}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The markdown table (one line per architecture and phase)."""
    cuda = args.device == "cuda"
    mem = "peak GPU MB" if cuda else "peak RSS MB"
    lines = [
        f"| arch | phase | loop s | frostline s | speed-up | CPU-time speed-up "
        f"| {mem} loop / frostline | final loss loop / frostline | frostline cache | flags |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['arch']} | {r['phase']} | - | - | - | - | - | - | {r['error']} | ERROR |"
            )
            continue
        speed = f"{r['speedup']:.2f}x"
        if cuda:
            n = args.samples * (args.epochs1 if r["phase"] == 1 else args.epochs2)
            speed += f" ({n / r['loop_s']:.0f} vs {n / r['frostline_s']:.0f} img/s)"
        cache = short_cache(r["cache_first"], r["cache"])
        lines.append(
            f"| {r['arch']} | {r['phase']} | {r['loop_s']:.2f} | {r['frostline_s']:.2f} | {speed} "
            f"| {_f(r.get('cpu_speedup'), '.2f')}x "
            f"| {_f(r['loop_mb'], '.0f')} / {_f(r['frostline_mb'], '.0f')} "
            f"| {r['loop_loss']:.4f} / {r['frostline_loss']:.4f} | {cache} "
            f"| {' '.join(r['flags']) or 'ok'} |"
        )
    return lines


def summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    out = []
    for phase, target in ((1, TARGET_P1), (2, TARGET_P2)):
        rs = [r for r in ok if r["phase"] == phase]
        if not rs:
            continue
        sp = sorted(r["speedup"] for r in rs)
        geo = math.exp(sum(math.log(s) for s in sp) / len(sp))
        met = sum(s >= target for s in sp)
        cpu = [r["cpu_speedup"] for r in rs if r.get("cpu_speedup")]
        cpu_geo = math.exp(sum(math.log(s) for s in cpu) / len(cpu)) if cpu else None
        out.append(
            f"phase {phase}: speed-up min {sp[0]:.2f}x, geometric mean {geo:.2f}x, max {sp[-1]:.2f}x; "
            f">= {target:g}x on {met}/{len(sp)} architectures; CPU-time speed-up geometric mean "
            f"{_f(cpu_geo, '.2f')}x"
        )
    flagged = sorted(
        {f"{r['arch']} p{r['phase']}: {' '.join(r['flags'])}" for r in rows if r["flags"]}
    )
    if args.quick or args.device != "cpu":
        out.append("(speed targets are checked on the default CPU workload only)")
    out.append("flagged: " + ("; ".join(flagged) if flagged else "none"))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Architectures: " + ", ".join(ARCHS),
    )
    p.add_argument("--archs", default=None, help="comma-separated subset (default: all CPU ones)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument(
        "--scale",
        choices=("tiny", "full"),
        default=None,
        help="model configs (default: tiny on cpu, full on cuda)",
    )
    p.add_argument("--image-size", type=int, default=None, help="default 32 (224 on cuda)")
    p.add_argument(
        "--seq-len", type=int, default=None, help="token sequence length (default 32; 128 on cuda)"
    )
    p.add_argument("--vocab", type=int, default=1000, help="token vocabulary (default 1000)")
    p.add_argument("--samples", type=int, default=None, help="training samples (default 1024)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (128 on cuda)")
    p.add_argument("--epochs1", type=int, default=None, help="phase 1 epochs (default 10)")
    p.add_argument("--epochs2", type=int, default=None, help="phase 2 epochs (default 3)")
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads for both peers (default 2)"
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per peer, interleaved; fastest per phase"
    )
    p.add_argument(
        "--optimizer",
        choices=("torch", "keras"),
        default="torch",
        help="torch: both peers use torch.optim.Adam (frostline through fl.optimizers.TorchOptimizer); "
        "keras: frostline uses fl.optimizers.Adam (Keras math) and the loop torch Adam with eps 1e-7",
    )
    p.add_argument(
        "--loop-fused",
        action="store_true",
        help="the loop's Adam runs torch's fused kernel too (fused=True; frostline's "
        "TorchOptimizer picks it by default, torch's own default on CPU is a per-tensor loop)",
    )
    p.add_argument(
        "--frozen-inference",
        action="store_true",
        help="run the frozen part in inference mode (fit(frozen_inference=True); the loop puts it in eval)",
    )
    p.add_argument(
        "--unfreeze-next",
        action="store_true",
        help="frostline's phase-1 fit is told what phase 2 unfreezes (fit(unfreeze_next=...), "
        "as two_phase does): phase 2 starts from values kept by phase 1's cache build",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 128 samples, 2+1 epochs")
    p.add_argument("--json", dest="json_out", default=None, help="write all results to this file")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--worker-arch", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.scale is None:
        args.scale = "full" if cuda else "tiny"
    defaults = {
        "image_size": 224 if cuda else 32,
        "seq_len": 128 if cuda else 32,
        "samples": 128 if args.quick else (2048 if cuda else 1024),
        "batch_size": 32 if args.quick else (128 if cuda else 64),
        "epochs1": 2 if args.quick else 10,
        "epochs2": 1 if args.quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.archs is None:
        names = [a.name for a in ARCHS.values() if a.cpu_default or cuda]
    else:
        names = [s.strip() for s in args.archs.split(",") if s.strip()]
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        p.error(f"unknown architecture(s) {unknown}; choose from {', '.join(ARCHS)}")
    if not names:
        p.error("--archs names no architecture")
    args.arch_list = names
    for key in (
        "samples",
        "batch_size",
        "epochs1",
        "epochs2",
        "repeat",
        "threads",
        "image_size",
        "seq_len",
    ):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.seq_len < 4:
        p.error(f"--seq-len must be >= 4, got {args.seq_len}")
    if args.vocab <= NUM_CLASSES * 5 + 1:
        p.error(f"--vocab must be > {NUM_CLASSES * 5 + 1} (class marker ids), got {args.vocab}")
    if args.precision != "fp32" and not cuda:
        p.error(f"--precision {args.precision} is for --device cuda (CPU runs fp32)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if not device_available(args.device):
        return 2
    load_before = os.getloadavg()
    machine = machine_info()
    print(
        f"architecture sweep: {len(args.arch_list)} architectures, {args.samples} samples "
        f"(images {args.image_size}px, tokens {args.seq_len}), batch {args.batch_size}, "
        f"{args.epochs1}+{args.epochs2} epochs, {args.threads} threads, device {args.device} "
        f"{args.precision}, {args.scale} configs; {machine['cores']} cores, "
        f"load average {load_before[0]:.2f}",
        flush=True,
    )
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for arch in args.arch_list:
        runs[arch] = {peer: [] for peer in PEERS}
        for rep in range(args.repeat):
            for peer in PEERS:
                r = _run_peer(arch, peer, args)
                runs[arch][peer].append(r)
                if "error" in r:
                    status = f"ERROR {r['error']}"
                else:
                    status = "  ".join(
                        f"phase {i + 1} ERROR {p['error']}"
                        if "error" in p
                        else f"phase {i + 1} {p['seconds']:7.2f} s loss {p['loss']:.4f}"
                        for i, p in enumerate(r["phases"])
                    )
                    status += f"  peak RSS {r['peak_rss_mb']:5.0f} MB"
                print(
                    f"  [{rep + 1}/{args.repeat}] {arch:22s} {peer:9s} {status}  "
                    f"(load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    results = {
        arch: {peer: _best(rs) for peer, rs in peers.items()} for arch, peers in runs.items()
    }
    load_after = os.getloadavg()
    rows = compare(results, args)
    lines = table(rows, args)
    notes = summary(rows, args)
    print()
    print("\n".join(lines))
    print()
    print("\n".join(notes))
    print(
        f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        f"({machine['cores']} cores)"
    )
    versions = next(
        (r["versions"] for peers in results.values() for r in peers.values() if "versions" in r), {}
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for arch, peers in results.items():
        for peer, r in peers.items():
            if "error" in r:
                print(f"\n--- {arch} / {peer} failed:\n{r['log_tail']}", file=sys.stderr)
            for i, p in enumerate(r.get("phases", [])):
                if "error" in p:
                    tb = "\n".join(p["traceback"])
                    print(f"\n--- {arch} / {peer} phase {i + 1} failed:\n{tb}", file=sys.stderr)
    if args.json_out:
        write_json(
            args.json_out,
            args,
            ("worker_arch",),
            load_before=load_before,
            load_after=load_after,
            rows=rows,
            results=results,
            runs=runs,
            table=lines,
            summary=notes,
        )
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
