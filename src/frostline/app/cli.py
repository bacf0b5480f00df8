"""The ``frostline`` command: ``demo``, ``fit`` and ``summary``.

``main(argv)`` returns the exit code (0 success, 1 training failed, 2 bad input or
usage, 130 interrupted); bad input is reported as one line on stderr, with no
traceback and no half-written run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "main"]

PROG = "frostline"
DEFAULT_MODEL = "efficientnet_lite0"


class UsageError(ValueError):
    """A bad flag or config value (reported in one line, exit code 2)."""


# --------------------------------------------------------------------------- argparse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``frostline fit: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _checked(convert, ok, expected: str):
    """An argparse ``type=`` that converts and checks, with one message for both failures."""

    def parse(text: str):
        try:
            v = convert(text)
        except (TypeError, ValueError):
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_count = _checked(int, lambda v: v >= 0, "an integer >= 0")
_rate = _checked(float, lambda v: 0 < v < float("inf"), "a positive number such as 1e-3")


_fraction = _checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_int = _checked(int, lambda v: True, "an integer")


def _depth(text: str) -> int | None:
    if str(text).lower() in ("all", "none", "0"):
        return None
    return _positive_int(text)


def _add_selection_flags(p: argparse.ArgumentParser, *, for_fit: bool) -> None:
    sup = argparse.SUPPRESS if for_fit else None
    g = p.add_argument_group(
        "freezing",
        "Applied in this order: --freeze-all, --freeze, --freeze-type, then --unfreeze-last."
        + ("\nWith none of the first three, fit freezes the whole base." if for_fit else ""),
    )
    if for_fit:
        g.add_argument(
            "--freeze-all",
            action=argparse.BooleanOptionalAction,
            default=sup,
            help="freeze every layer of the base, the Keras 'base.trainable = False' (default: on, unless --freeze or --freeze-type is given)",
        )
    else:
        g.add_argument(
            "--freeze-all",
            action="store_true",
            default=False,
            help="freeze every layer, the Keras 'model.trainable = False'",
        )
    g.add_argument(
        "--freeze",
        metavar="PATTERN",
        action="append",
        default=sup,
        help="freeze the leaf layers a selector matches: a glob on dotted names ('blocks.[0-3]*'), "
        "'first:K', 'last:K', 'range:A:B', 'type:Conv2d', 're:REGEX' (repeatable)",
    )
    g.add_argument(
        "--freeze-type",
        metavar="TYPE",
        action="append",
        default=sup,
        help="freeze every layer of a class, by class name: Conv2d, BatchNorm2d, ... (repeatable, or comma-separated)",
    )
    if for_fit:
        g.add_argument(
            "--unfreeze-last",
            metavar="K",
            type=_count,
            default=sup,
            help="phase 2: unfreeze the last K leaf layers of the base, recompile with --lr2 and train "
            "--epochs2 more epochs (default: 0, no phase 2)",
        )
    else:
        g.add_argument(
            "--unfreeze-last",
            metavar="K",
            type=_count,
            default=None,
            help="then unfreeze the last K leaf layers (what 'frostline summary --leaves' numbers)",
        )


DEMO_DESCRIPTION = """\
Two-phase transfer learning end to end, offline, on a CPU, in about a minute or two.

EfficientNet-Lite0 with its packaged ImageNet weights is the frozen base, a new Linear
layer the head; the data is scikit-learn's bundled digits (upscaled to RGB) with a few
labelled examples per class, the rest held out. Phase 1 trains the head with the base
frozen (Adam 1e-3); phase 2 unfreezes the last layers of the base and recompiles with
Adam 1e-5. For comparison the same architecture is trained from random initialisation
on the same examples for the same number of epochs.

Prints the summary before and after freezing, the held-out accuracy of each phase, the
frozen-weights verification and the time per epoch, and writes a run directory with
report.md, metrics.csv, metrics.json, curves.png, freeze_map.png and model.safetensors.
"""

FIT_DESCRIPTION = """\
Train a classifier on your images with the two-phase transfer-learning recipe.

DATA is a folder with one subfolder of images per class (DATA/cat/1.jpg, DATA/dog/2.png;
any format Pillow reads) or an .npz file with arrays x (uint8 images NxHxW[xC], or float
inputs used as given) and y (labels). A stratified --validation-split is held out.

--model is a zoo name (the pretrained model minus its classifier becomes the base, a new
Linear layer the head; efficientnet_lite0 works offline) or 'package.module:factory', a
function called with num_classes=N that returns a torch.nn.Module; its last leaf layer is
taken as the head and never frozen by --freeze-all.

Phase 1 trains with the base frozen as selected (Adam --lr1, --epochs1 epochs). Phase 2
(with --unfreeze-last K) unfreezes the last K leaf layers of the base, keeps BatchNorm in
inference mode, recompiles with Adam --lr2 and trains --epochs2 epochs. Frozen weights are
verified bit for bit after each phase.

Options may come from a TOML or YAML file (--config; keys are the option names, e.g.
epochs1 = 5, freeze = ["blocks.0*"]); flags on the command line override the file.
"""

SUMMARY_DESCRIPTION = """\
Print the Keras-style summary of a zoo model (or a 'package.module:factory' import path)
after applying a freezing selection: the layer table with a Trainable column, then the
Total / Trainable / Non-trainable parameter lines.

  frostline summary efficientnet_lite0 --freeze-all --unfreeze-last 5
  frostline summary efficientnet_lite0 --leaves --freeze-type BatchNorm2d

--leaves lists every leaf layer (module that owns weights) with the index that
first:K / last:K / range:A:B count. No weights are downloaded: the architecture is built
with random weights (parameter counts are the same).
"""


def _version() -> str:
    """The installed version, without importing torch (keeps --help instant)."""
    try:
        from importlib.metadata import version

        return version("frostline")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="frostline: Keras/TF.js layer freezing for PyTorch models, from the command line.",
        epilog="Run 'frostline COMMAND --help' for a command's options. Start with: frostline demo",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"frostline {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser(
        "demo",
        help="two-phase transfer learning on the bundled digits, end to end",
        description=DEMO_DESCRIPTION,
        formatter_class=_Formatter,
    )
    d.add_argument(
        "--fast",
        action="store_true",
        help="a seconds-long smoke run: 3 examples per class, 60 held out, 32 px, 1+1 epochs",
    )
    d.add_argument(
        "--out",
        metavar="DIR",
        help="run directory to create (default: ./frostline-runs/demo-<timestamp>)",
    )
    d.add_argument(
        "--seed",
        type=_int,
        default=0,
        help="random seed for the split, the head and the shuffling (default: 0)",
    )
    d.add_argument(
        "--per-class",
        metavar="K",
        type=_positive_int,
        help="labelled training examples per digit (default: 20; --fast: 3)",
    )
    d.add_argument(
        "--image-size",
        metavar="S",
        type=_positive_int,
        help="side of the upscaled images in pixels (default: 64; --fast: 32)",
    )
    d.add_argument(
        "--epochs1",
        metavar="N",
        type=_count,
        help="phase 1 epochs, head only (default: 12; --fast: 1)",
    )
    d.add_argument(
        "--epochs2",
        metavar="N",
        type=_count,
        help="phase 2 epochs, last layers unfrozen (default: 4; --fast: 1)",
    )
    d.add_argument(
        "--unfreeze-last",
        metavar="K",
        type=_count,
        help="leaf layers of the base to unfreeze in phase 2 (default: 5)",
    )
    d.add_argument(
        "--heldout",
        metavar="N",
        type=_positive_int,
        help="evaluate on a class-balanced sample of N held-out digits (default: all the rest; --fast: 60)",
    )
    d.add_argument("--no-baseline", action="store_true", help="skip the from-scratch comparison")
    d.add_argument(
        "--threads",
        metavar="N",
        type=_positive_int,
        help="CPU threads for torch (default: torch's choice)",
    )
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser(
        "fit",
        help="train a classifier on an image folder or .npz with frozen layers",
        description=FIT_DESCRIPTION,
        formatter_class=_Formatter,
    )
    S = argparse.SUPPRESS  # noqa: N806 - only flags given on the command line override the config file
    f.add_argument(
        "data",
        metavar="DATA",
        nargs="?",
        default=S,
        help="image folder (one subfolder per class) or .npz file with x and y",
    )
    f.add_argument(
        "--model",
        metavar="NAME_OR_IMPORT_PATH",
        default=S,
        help=f"zoo name or package.module:factory (default: {DEFAULT_MODEL})",
    )
    _add_selection_flags(f, for_fit=True)
    t = f.add_argument_group("training")
    t.add_argument(
        "--epochs1", metavar="N", type=_count, default=S, help="phase 1 epochs (default: 5)"
    )
    t.add_argument(
        "--epochs2",
        metavar="N",
        type=_count,
        default=S,
        help="phase 2 epochs, with --unfreeze-last (default: 5)",
    )
    t.add_argument(
        "--lr1",
        metavar="LR",
        type=_rate,
        default=S,
        help="phase 1 Adam learning rate (default: 1e-3)",
    )
    t.add_argument(
        "--lr2",
        metavar="LR",
        type=_rate,
        default=S,
        help="phase 2 Adam learning rate (default: 1e-5)",
    )
    t.add_argument(
        "--batch-size", metavar="N", type=_positive_int, default=S, help="batch size (default: 32)"
    )
    t.add_argument(
        "--image-size",
        metavar="S",
        type=_positive_int,
        default=S,
        help="images are centre-cropped and resized to SxS (default: the model's input size, else 224)",
    )
    t.add_argument(
        "--validation-split",
        metavar="F",
        type=_fraction,
        default=S,
        help="fraction of every class held out for validation (default: 0.2; 0 = none)",
    )
    t.add_argument(
        "--batchnorm",
        choices=["inference", "auto", "batch_stats"],
        default=S,
        help="BatchNorm of unfrozen base layers in phase 2: inference = running statistics (Keras advice, default), "
        "auto = batch statistics while trainable, batch_stats = always batch statistics",
    )
    t.add_argument("--seed", metavar="N", type=_int, default=S, help="random seed (default: 0)")
    t.add_argument(
        "--threads", metavar="N", type=_positive_int, default=S, help="CPU threads for torch"
    )
    o = f.add_argument_group("output")
    o.add_argument(
        "--out",
        metavar="DIR",
        default=S,
        help="run directory to create (default: ./frostline-runs/fit-<timestamp>)",
    )
    o.add_argument(
        "--config",
        metavar="FILE",
        default=S,
        help="TOML (.toml) or YAML (.yaml/.yml) file with default option values",
    )
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser(
        "summary",
        help="print a model's summary after freezing",
        description=SUMMARY_DESCRIPTION,
        formatter_class=_Formatter,
    )
    s.add_argument(
        "model",
        metavar="MODEL",
        help="zoo name (e.g. efficientnet_lite0) or package.module:factory",
    )
    _add_selection_flags(s, for_fit=False)
    v = s.add_argument_group("display")
    v.add_argument(
        "--depth",
        metavar="N",
        type=_depth,
        default=1,
        help="levels of nesting to show (default: 1; 'all' for every level)",
    )
    v.add_argument(
        "--leaves",
        action="store_true",
        help="list every leaf layer with its index instead of the nested table",
    )
    v.add_argument(
        "--headless", action="store_true", help="drop the classifier (the base that fit trains on)"
    )
    v.add_argument(
        "--num-classes",
        metavar="N",
        type=_positive_int,
        help="replace the classifier with an N-way one (or pass num_classes=N to a factory)",
    )
    v.add_argument(
        "--image-size",
        metavar="S",
        type=_positive_int,
        help="add an Output Shape column for an SxS RGB input",
    )
    s.set_defaults(func=cmd_summary)
    return parser


# --------------------------------------------------------------------------- helpers


def _err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def is_import_path(spec: str) -> bool:
    return ":" in spec and not os.path.exists(spec)


def import_factory(spec: str) -> Callable:
    """``package.module:factory`` -> the callable (the current directory is importable)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(
            f"--model {spec!r} is not a zoo name or an import path; expected 'package.module:factory'"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(
            f"--model {spec!r}: cannot import module {mod_name!r} ({_one_line(e)}); expected an importable package.module:factory"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(
            f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory"
        )
    return obj


def build_import_model(spec: str, num_classes: int | None):
    """Call the factory (with ``num_classes=`` when given) and wrap the result as a Model."""
    from torch import nn

    import frostline as fl

    factory = import_factory(spec)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        made = factory(**kwargs)
    except TypeError as e:
        raise UsageError(
            f"--model {spec!r}: calling it with {kwargs or 'no arguments'} failed ({_one_line(e)}); the factory must accept num_classes="
        ) from None
    if isinstance(made, fl.Model):
        model = made
    elif isinstance(made, nn.Module):
        model = fl.wrap(made, name=spec.rpartition(":")[2])
    else:
        raise UsageError(
            f"--model {spec!r} returned a {type(made).__name__}; expected a torch.nn.Module"
        )
    model.meta.setdefault(
        "architecture", {"kind": "import", "target": spec, "args": [], "kwargs": kwargs}
    )
    return model


def _split_types(values: Sequence[str]) -> list[str]:
    return [t.strip() for v in values for t in str(v).split(",") if t.strip()]


def _resolve_types(target, names: Sequence[str]) -> list:
    """Class names -> the classes in ``target`` named so or subclassing one named so.

    ``BatchNorm2d`` then also matches timm's ``BatchNormAct2d``; a name no module
    carries is passed on as is (the selector's error lists what exists).
    """
    out: list = []
    for name in names:
        found = {
            type(m)
            for m in target.module.modules()
            if any(c.__name__ == name for c in type(m).__mro__)
        }
        out += sorted(found, key=lambda c: c.__name__) if found else [name]
    return out


def apply_selection(
    target,
    *,
    freeze_all: bool,
    freeze: Sequence[str] = (),
    freeze_type: Sequence[str] = (),
    head_excluded: bool = False,
) -> list:
    """Freeze on ``target`` as the flags ask; returns the Plans. ``head_excluded`` keeps the last leaf trainable under --freeze-all."""
    import frostline as fl

    plans = []
    try:
        if freeze_all:
            plans.append(target.freeze(~fl.select.last(1) if head_excluded else None))
        for spec in freeze:
            if spec.startswith("type:"):
                plans.append(
                    target.freeze(
                        fl.select.of_type(*_resolve_types(target, _split_types([spec[5:]])))
                    )
                )
            else:
                plans.append(target.freeze(fl.select.parse(spec)))
        types = _split_types(freeze_type)
        if types:
            plans.append(target.freeze(fl.select.of_type(*_resolve_types(target, types))))
    except fl.SelectionError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(_one_line(e)) from None
    return plans


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise UsageError(f"config key {key!r} must be true or false, got {value!r}")


def _list_of_str(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"config key {key!r} must be a string or a list of strings, got {value!r}")


def _str(value: Any, key: str) -> str:
    if isinstance(value, str | os.PathLike) and str(value):
        return str(value)
    raise UsageError(f"config key {key!r} must be a non-empty string, got {value!r}")


def _via(fn: Callable[[str], Any]) -> Callable[[Any, str], Any]:
    def convert(value: Any, key: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise UsageError(f"config key {key!r} has an invalid value {value!r}")
        try:
            return fn(str(value))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"config key {key!r}: {e}") from None

    return convert


def _choice(*options: str) -> Callable[[Any, str], str]:
    def convert(value: Any, key: str) -> str:
        if value not in options:
            raise UsageError(
                f"config key {key!r} must be one of {', '.join(options)}, got {value!r}"
            )
        return value

    return convert


FIT_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "data": _str,
    "model": _str,
    "freeze_all": _bool,
    "freeze": _list_of_str,
    "freeze_type": _list_of_str,
    "unfreeze_last": _via(_count),
    "epochs1": _via(_count),
    "epochs2": _via(_count),
    "lr1": _via(_rate),
    "lr2": _via(_rate),
    "batch_size": _via(_positive_int),
    "image_size": _via(_positive_int),
    "validation_split": _via(_fraction),
    "batchnorm": _choice("inference", "auto", "batch_stats"),
    "seed": _via(_int),
    "threads": _via(_positive_int),
    "out": _str,
}

FIT_DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "freeze": [],
    "freeze_type": [],
    "unfreeze_last": 0,
    "epochs1": 5,
    "epochs2": 5,
    "lr1": 1e-3,
    "lr2": 1e-5,
    "batch_size": 32,
    "image_size": None,
    "validation_split": 0.2,
    "batchnorm": "inference",
    "seed": 0,
    "threads": None,
    "out": None,
}


def load_config(path: str) -> dict[str, Any]:
    """Option values from a TOML or YAML file (a top-level ``fit`` table is used when present)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path!r} does not exist; expected a .toml or .yaml file")
    suffix = p.suffix.lower()
    text = p.read_bytes()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise UsageError(
                        "TOML config files need Python 3.11+ (tomllib) or the tomli package; use a .yaml file instead"
                    ) from None
            data = tomllib.loads(text.decode("utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text.decode("utf-8"))
        else:
            raise UsageError(
                f"config file {path!r} has suffix {suffix or '(none)'!r}; expected .toml, .yaml or .yml"
            )
    except UsageError:
        raise
    except Exception as e:  # parse errors of either format
        raise UsageError(f"config file {path!r} could not be parsed ({_one_line(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(
            f"config file {path!r} holds a {type(data).__name__}; expected a table of option = value"
        )
    if isinstance(data.get("fit"), dict):
        data = data["fit"]
    out: dict[str, Any] = {}
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        if key not in FIT_KEYS:
            raise UsageError(
                f"config file {path!r} has unknown key {raw!r}; known keys: {', '.join(FIT_KEYS)}"
            )
        out[key] = FIT_KEYS[key](value, key)
    return out


def resolve_fit_options(ns: argparse.Namespace) -> dict[str, Any]:
    """Built-in defaults <- config file <- command-line flags."""
    given = {k: v for k, v in vars(ns).items() if k not in ("func", "command", "config")}
    config = load_config(ns.config) if getattr(ns, "config", None) else {}
    opts = {**FIT_DEFAULTS, **config, **given}
    if "freeze_all" not in config and "freeze_all" not in given:
        opts["freeze_all"] = not (opts["freeze"] or opts["freeze_type"])
    if not opts.get("data"):
        raise UsageError(
            "fit needs DATA: an image folder (one subfolder per class) or an .npz file, on the command line or as 'data' in --config"
        )
    return opts


# --------------------------------------------------------------------------- commands


def cmd_demo(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    from frostline.app.demo import DemoConfig, run_demo

    values: dict[str, Any] = DemoConfig.fast_defaults() if ns.fast else {}
    for key in (
        "per_class",
        "image_size",
        "epochs1",
        "epochs2",
        "unfreeze_last",
        "heldout",
        "threads",
    ):
        if getattr(ns, key) is not None:
            values[key] = getattr(ns, key)
    cfg = DemoConfig(out=ns.out, seed=ns.seed, baseline=not ns.no_baseline, **values)
    run_demo(cfg, command=_command(argv))
    return 0


def cmd_summary(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    import frostline as fl

    if is_import_path(ns.model):
        model = build_import_model(ns.model, ns.num_classes)
    else:
        if ns.headless and ns.num_classes:
            raise UsageError("--headless drops the classifier; it cannot take --num-classes")
        model = fl.models.pretrained(
            ns.model, pretrained=False, headless=ns.headless, num_classes=ns.num_classes
        )
    plans = apply_selection(
        model, freeze_all=ns.freeze_all, freeze=ns.freeze or (), freeze_type=ns.freeze_type or ()
    )
    if ns.unfreeze_last:
        plans.append(model.unfreeze(fl.select.last(ns.unfreeze_last)))
    for plan in plans:
        print(plan.summary_line())
    if plans:
        print()
    shape = (3, ns.image_size, ns.image_size) if ns.image_size else None
    model.summary(depth=ns.depth, leaves=ns.leaves, input_shape=shape)
    return 0


def _command(argv: Sequence[str]) -> str:
    return " ".join([PROG, *(shlex.quote(a) for a in argv)])


def cmd_fit(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    opts = resolve_fit_options(ns)
    import torch

    import frostline as fl
    from frostline.api.summary import counts
    from frostline.app import demo, imagefolder, report

    t_start, cpu_start = time.perf_counter(), time.process_time()
    spec = opts["model"]
    importing = is_import_path(spec)
    if importing:
        import_factory(spec)  # fail fast, before reading the data
        mean, std = imagefolder.IMAGENET_MEAN, imagefolder.IMAGENET_STD
        default_size = 224
    else:
        # an unknown name fails here (ZooError), before the data is read
        cfg = fl.models.data_config(spec)
        mean, std = cfg["mean"], cfg["std"]
        default_size = int(cfg["input_size"][-1])
    image_size = opts["image_size"] or default_size
    final = Path(opts["out"]) if opts["out"] else report.default_run_dir("fit")
    report.check_run_dir(final)

    threads, why = demo.choose_threads(opts["threads"])
    print(f"threads: {threads} ({why})")
    t = time.perf_counter()
    data = imagefolder.load_data(opts["data"], image_size)
    for w in data.warnings:
        _warn(w)
    train_idx, val_idx = imagefolder.stratified_split(
        data.y, opts["validation_split"], opts["seed"]
    )
    print(
        f"data: {data.source}: {len(data)} samples, {data.num_classes} classes ({', '.join(data.class_names[:10])}{', ...' if data.num_classes > 10 else ''}); "
        f"{len(train_idx)} for training, {len(val_idx)} for validation ({time.perf_counter() - t:.1f} s)"
    )

    def as_input(idx):
        if data.is_images:
            return imagefolder.ImageArrayDataset(data.x[idx], data.y[idx], mean, std), None
        return data.x[idx], data.y[idx]

    x_tr, y_tr = as_input(train_idx)
    val = None
    if len(val_idx):
        x_va, y_va = as_input(val_idx)
        val = x_va if y_va is None else (x_va, y_va)

    fl.seed_everything(opts["seed"])
    if importing:
        model = build_import_model(spec, data.num_classes)
        base = model
        head_desc = f"`{spec}(num_classes={data.num_classes})`; its last leaf layer is the head"
    else:
        model, base = demo.build_classifier(spec, data.num_classes, image_size)
        head = model.layers[-1].module
        head_desc = (
            f"`fl.Sequential([base, head])`: base = `fl.models.pretrained('{spec}', headless=True)`, "
            f"head = `nn.Linear({head.in_features}, {head.out_features})`"
        )

    record = demo.base_record("fit", _command(argv), torch.get_num_threads())
    record["title"] = f"frostline fit: {spec} on {data.source}"
    record["val_name"] = "validation"
    record["config"] = {k: v for k, v in opts.items()}
    record["warnings"] = list(data.warnings)
    record["dataset"] = {
        "description": (
            "image folder" if data.is_images and Path(data.source).is_dir() else ".npz file"
        )
        + f", classes: {', '.join(data.class_names)}",
        "source": data.source,
        "num_classes": data.num_classes,
        "train": len(train_idx),
        "val": len(val_idx),
        "image_size": f"{image_size} x {image_size}"
        if data.is_images
        else f"inputs as given, shape {tuple(data.x.shape[1:])}",
        "preprocessing": f"centre crop, bicubic resize, (x - mean) / std with mean {tuple(mean)}, std {tuple(std)}"
        if data.is_images
        else "none (float inputs used as given)",
    }
    record["model"] = {
        "name": model.name,
        "description": head_desc,
        "total_params": counts(model.module).total,
    }
    summaries = {"Summary before freezing": model.summary_text()}
    print("\nBefore freezing:")
    print(summaries["Summary before freezing"])
    plans = apply_selection(
        base,
        freeze_all=opts["freeze_all"],
        freeze=opts["freeze"],
        freeze_type=opts["freeze_type"],
        head_excluded=importing,
    )
    for plan in plans:
        print(plan.summary_line())
    summaries["Summary after freezing (phase 1)"] = model.summary_text()
    print("\nAfter freezing:")
    print(summaries["Summary after freezing (phase 1)"])
    states = [demo.leaf_states(model)]
    what = "; ".join(p.summary_line() for p in plans) or "nothing frozen"

    phases = []
    print(f"\nPhase 1: Adam({demo.format_rate(opts['lr1'])}), {opts['epochs1']} epoch(s)")
    p1 = demo.train_phase(
        model,
        name="phase 1",
        title="base frozen as selected" if plans else "all layers",
        x=x_tr,
        y=y_tr,
        validation_data=val,
        epochs=opts["epochs1"],
        learning_rate=opts["lr1"],
        batch_size=opts["batch_size"],
        seed=opts["seed"],
        plan=what,
    )
    phases.append(p1)
    print(demo.describe_phase(p1, "validation"))
    print(f"  {p1['verification']}")
    k = opts["unfreeze_last"]
    if k and opts["epochs2"]:
        if opts["batchnorm"] != "auto" and any(
            fl.batchnorm.is_batchnorm(m) for m in base.module.modules()
        ):
            base.set_batchnorm_mode(opts["batchnorm"])
        plan = base.unfreeze(fl.select.last(k + 1 if importing else k))
        summaries[f"Summary after unfreezing the last {k} base layers (phase 2)"] = (
            model.summary_text()
        )
        print(
            f"\nPhase 2: unfreeze the last {k} leaf layers of the base, recompile with Adam({demo.format_rate(opts['lr2'])}), {opts['epochs2']} epoch(s)"
        )
        print(str(plan))
        p2 = demo.train_phase(
            model,
            name="phase 2",
            title=f"+ last {k} base layers",
            x=x_tr,
            y=y_tr,
            validation_data=val,
            epochs=opts["epochs2"],
            learning_rate=opts["lr2"],
            batch_size=opts["batch_size"],
            seed=opts["seed"] + 1,
            plan=plan.summary_line(),
        )
        phases.append(p2)
        states.append(demo.leaf_states(model))
        print(demo.describe_phase(p2, "validation"))
        print(f"  {p2['verification']}")
    elif opts["epochs2"] and "epochs2" in vars(ns):
        _warn(
            "--epochs2 has no effect without --unfreeze-last K (phase 2 unfreezes the last K base layers)"
        )
    record["phases"] = phases
    record["summaries"] = summaries
    acc = (phases[-1].get("val") or {}).get("accuracy")
    if acc is not None:
        record["conclusion"] = (
            f"**Validation accuracy after training: {100 * acc:.1f}% on {len(val_idx)} held-out samples.**"
        )
    record["freeze_note"] = (
        "Each bar is one leaf layer (a module that owns weights), in forward order, coloured by its trainable state."
    )
    leaves = demo.merge_leaf_states(states)
    with report.RunDirectory(final) as run:
        record["timings"] = {}
        demo.write_run(run.path, record, model, leaves)
        record["timings"].update(
            total_s=time.perf_counter() - t_start, cpu_s=time.process_time() - cpu_start
        )
        report.write_metrics(run.path, record)
        report.write_report(run.path / "report.md", record)
        path = run.commit()
    print(f"\nrun directory: {path}")
    print(
        f"total time: {time.perf_counter() - t_start:.1f} s wall, {time.process_time() - cpu_start:.1f} s CPU, {torch.get_num_threads()} thread(s)"
    )
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    import torch

    from frostline.api.select import SelectionError
    from frostline.app import imagefolder, report
    from frostline.engine.data import DataError
    from frostline.engine.trainer import TrainingError
    from frostline.models import ZooError

    bad_input = (
        UsageError,
        imagefolder.InputError,
        ZooError,
        SelectionError,
        report.RunDirectoryError,
        DataError,
    )
    threads = torch.get_num_threads()  # commands may lower it; in-process callers get it back
    try:
        return int(ns.func(ns, argv) or 0)
    except bad_input as e:
        _err(_one_line(e))
        return 2
    except TrainingError as e:
        _err(f"training failed: {_one_line(e)}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted (no run directory was written)")
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error worth a message
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 141
    except OSError as e:  # disk full, permissions: a run directory being written was removed
        _err(_one_line(e))
        return 1
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
