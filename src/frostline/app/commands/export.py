"""``frostline export RUN_DIR``: a trained run's model as an ONNX file or a torch.export program."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from frostline.app.config import UsageError, option, resolve
from frostline.app.run_options import run_dir_option, threads_option, trust_option

NAME = "export"
HELP = "export the model of a run directory to ONNX or a torch.export program"
DESCRIPTION = """\
Export the model that 'frostline fit' or 'frostline demo' trained, for inference: LoRA
adapters merged into their kernels, BatchNorm after a conv folded into it, eval mode, a
free batch size. The export is checked against the model (ONNX: with onnxruntime) before
it is written, atomically.

The exported model takes inputs prepared as the run's preprocessing.json says (for
images: float tensors of shape (batch, channels, image_size, image_size), normalised with
its mean and std) and returns one score per class (logits).

  frostline export runs/photos                     # runs/photos/model.onnx
  frostline export runs/photos --format torch      # runs/photos/model.pt2
  frostline export runs/photos --output deploy/photos.onnx

ONNX needs the export extra: pip install "frostline[export]".
"""


@dataclass
class Options:
    run_dir: str = run_dir_option()
    format: str = option(
        "onnx", choices=("onnx", "torch"), metavar="FORMAT", help="onnx or torch (.pt2)"
    )
    output: str | None = option(
        None,
        metavar="FILE",
        help="where to write (default: RUN_DIR/model.onnx or RUN_DIR/model.pt2)",
    )
    trust: list = trust_option()
    threads: int | None = threads_option()


def options(ns) -> Options:
    return resolve(Options, ns)


def run(opts: Options, command: str) -> int:
    import torch

    from frostline.api.export import FORMATS, ExportError
    from frostline.app import inference

    suffix = FORMATS[opts.format]
    target = Path(opts.output) if opts.output else Path(opts.run_dir) / f"model{suffix}"
    if target.suffix != suffix:
        raise UsageError(f"--output {str(target)!r}: {opts.format} files end in {suffix}")
    if target.is_dir() or not target.parent.is_dir():
        what = "is a folder" if target.is_dir() else "is in a folder that does not exist"
        raise UsageError(
            f"--output {str(target)!r} {what}; expected a file path in an existing folder"
        )
    if opts.threads:
        torch.set_num_threads(opts.threads)
    loaded = inference.load_run(opts.run_dir, opts.trust)
    info = loaded.info
    if info.input == "images":
        assert info.image_size is not None  # checked on read
        shape = [info.channels, info.image_size, info.image_size]
    else:
        shape = list(info.input_shape or [])
    try:
        path = loaded.model.export(target, format=opts.format, input_shape=shape)
    except ExportError as e:
        print(f"frostline: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(
        f"exported {opts.run_dir} ({opts.format}, input (batch, {', '.join(map(str, shape))})) to {path}"
    )
    return 0
