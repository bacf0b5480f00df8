"""``frostline fit DATA``: two-phase transfer learning on an image folder or an ``.npz`` file."""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from frostline.app.config import (
    UsageError,
    count,
    fraction,
    given_flags,
    image_side,
    integer,
    option,
    positive_int,
    rate,
    read_config,
    resolve,
    thread_count,
)

NAME = "fit"
HELP = "train a classifier on an image folder or .npz with frozen layers"
DEFAULT_MODEL = "efficientnet_lite0"
DESCRIPTION = """\
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
verified bit for bit after each phase. Both phases run fl.recipes.two_phase.

The run directory records the preprocessing (preprocessing.json), so that
'frostline predict RUN_DIR IMAGES' and 'frostline evaluate RUN_DIR HELD_OUT' prepare new
images exactly as training did.

Options may come from a TOML or YAML file (--config; keys are the option names, e.g.
epochs1 = 5, freeze = ["blocks.0*"]); flags on the command line override the file.
"""

FREEZE_HELP = (
    "freeze the leaf layers a selector matches: a glob on dotted names ('blocks.[0-3]*'), "
    "'first:K', 'last:K', 'range:A:B', 'type:Conv2d', 're:REGEX' (repeatable)"
)
FREEZE_TYPE_HELP = "freeze every layer of a class, by class name: Conv2d, BatchNorm2d, ... (repeatable, or comma-separated)"
FREEZING = "freezing"
#: checkpoints fit keeps in --checkpoint-dir (fl.Model.fit's keep_checkpoints default)
KEPT_CHECKPOINTS = 3
TRAINING = "training"
OUTPUT = "output"


@dataclass
class Options:
    """The options of ``frostline fit``: each field is a flag and a config-file key."""

    data: str | None = option(
        None,
        positional=True,
        metavar="DATA",
        help="image folder (one subfolder per class) or .npz file with x and y",
    )
    model: str = option(
        DEFAULT_MODEL,
        metavar="NAME_OR_IMPORT_PATH",
        help="zoo name or package.module:factory",
    )
    freeze_all: bool | None = option(
        None,
        switch=True,
        negatable=True,
        group=FREEZING,
        help="freeze every layer of the base, the Keras 'base.trainable = False'",
        default_help="on, unless --freeze or --freeze-type is given",
    )
    freeze: list = option(list, repeat=True, metavar="PATTERN", group=FREEZING, help=FREEZE_HELP)
    freeze_type: list = option(
        list, repeat=True, metavar="TYPE", group=FREEZING, help=FREEZE_TYPE_HELP
    )
    unfreeze_last: int = option(
        0,
        parse=count,
        metavar="K",
        group=FREEZING,
        help="phase 2: unfreeze the last K leaf layers of the base, recompile with --lr2 and train "
        "--epochs2 more epochs",
        default_help="0, no phase 2",
    )
    epochs1: int = option(5, parse=count, metavar="N", group=TRAINING, help="phase 1 epochs")
    epochs2: int = option(
        5, parse=count, metavar="N", group=TRAINING, help="phase 2 epochs, with --unfreeze-last"
    )
    lr1: float = option(
        1e-3,
        parse=rate,
        metavar="LR",
        group=TRAINING,
        help="phase 1 Adam learning rate",
        default_help="1e-3",
    )
    lr2: float = option(
        1e-5,
        parse=rate,
        metavar="LR",
        group=TRAINING,
        help="phase 2 Adam learning rate",
        default_help="1e-5",
    )
    augment: list = option(
        list,
        repeat=True,
        metavar="KIND",
        group=TRAINING,
        help="random augmentation of the training images, as Keras's layers: flip "
        "(RandomFlip('horizontal')), rotate (RandomRotation(0.1)); comma-separated or repeated. "
        "Augmented images are never cached: the frozen base runs on every batch",
        default_help="none",
    )
    batch_size: int = option(32, parse=positive_int, metavar="N", group=TRAINING, help="batch size")
    image_size: int | None = option(
        None,
        parse=image_side,
        metavar="S",
        group=TRAINING,
        help="images are centre-cropped and resized to SxS",
        default_help="the model's input size, else 224",
    )
    validation_split: float = option(
        0.2,
        parse=fraction,
        metavar="F",
        group=TRAINING,
        help="fraction of every class held out for validation (0 = none)",
    )
    batchnorm: str = option(
        "inference",
        choices=("inference", "auto", "batch_stats"),
        group=TRAINING,
        help="BatchNorm of the base in phase 2: inference = running statistics (Keras advice), "
        "auto = batch statistics while trainable, batch_stats = always batch statistics",
    )
    seed: int = option(0, parse=integer, metavar="N", group=TRAINING, help="random seed")
    workers: int = option(
        0,
        parse=count,
        metavar="N",
        group=TRAINING,
        help="worker processes reading (and augmenting) the batches the frozen base runs on "
        "every epoch; the epoch that builds the activation cache reads in the training process, "
        "the epochs it serves read no image",
        default_help="0, read in the training process",
    )
    threads: int | None = option(
        None,
        parse=thread_count,
        metavar="N",
        group=TRAINING,
        help="CPU threads for torch",
        default_help="torch's default, lowered to the idle cores of a busy machine",
    )
    out: str | None = option(
        None,
        metavar="DIR",
        group=OUTPUT,
        help="run directory to create",
        default_help="./frostline-runs/fit-<timestamp>",
    )
    checkpoint_dir: str | None = option(
        None,
        metavar="DIR",
        group=OUTPUT,
        help="save a checkpoint after every epoch into DIR (the last 3 are kept), for --resume",
    )
    resume: str | None = option(
        None,
        metavar="DIR",
        group=OUTPUT,
        help="go on from the newest checkpoint in DIR, with the same DATA and options, to the "
        "result a run that never stopped gives; checkpoints go on into DIR unless "
        "--checkpoint-dir names another folder",
    )
    quiet: bool = option(
        False,
        switch=True,
        group=OUTPUT,
        help="print no progress, summaries or results: warnings, errors and the run directory's path only",
    )
    config: str | None = option(
        None,
        metavar="FILE",
        group=OUTPUT,
        in_config=False,
        help="TOML (.toml) or YAML (.yaml/.yml) file with default option values",
    )
    flags: frozenset = frozenset()  # the options given on the command line (not a flag itself)


def options(ns: argparse.Namespace) -> Options:
    """Built-in defaults <- config file <- command-line flags."""
    config = read_config(ns.config, Options, section="fit") if getattr(ns, "config", None) else {}
    flags = given_flags(Options, ns)
    opts = resolve(Options, ns, config, flags=frozenset(flags))
    if opts.freeze_all is None:
        opts.freeze_all = not (opts.freeze or opts.freeze_type)
    opts.augment = [t.strip() for v in opts.augment for t in str(v).split(",") if t.strip()]
    unknown = sorted(set(opts.augment) - {"flip", "rotate"})
    if unknown:
        raise UsageError(
            f"--augment: unknown augmentation {', '.join(map(repr, unknown))}; choose from flip, rotate"
        )
    if not opts.data:
        raise UsageError(
            "fit needs DATA: an image folder (one subfolder per class) or an .npz file, on the command line or as 'data' in --config"
        )
    return opts


def run(opts: Options, command: str) -> int:
    """Train as ``opts`` say and write the run directory; the decoded images live in a
    temporary store removed when the run ends (however it ends)."""
    with contextlib.ExitStack() as scratch:
        return _run(opts, command, scratch)


def _run(opts: Options, command: str, scratch: contextlib.ExitStack) -> int:
    import torch

    import frostline as fl
    from frostline.api.summary import counts
    from frostline.app import imagefolder, outputs, report, training
    from frostline.app.extras import check_installed
    from frostline.app.models import (
        build_import_model,
        freeze_selector,
        import_factory,
        is_import_path,
    )
    from frostline.app.runinfo import Preprocessing

    check_installed("matplotlib", "the run directory's plots")  # before hours of training
    t_start, cpu_start = time.perf_counter(), time.process_time()
    spec = opts.model
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
    image_size = opts.image_size or default_size
    final = Path(opts.out) if opts.out else report.default_run_dir("fit")
    report.check_output(final)  # before the data is read: exists, under a file, read-only

    def say(text: str = "") -> None:
        if not opts.quiet:
            print(text)

    checkpoints = opts.checkpoint_dir or opts.resume
    if opts.resume and not Path(opts.resume).is_dir():
        raise UsageError(
            f"--resume {opts.resume!r} is not a folder; expected the --checkpoint-dir of the run to go on with"
        )
    if checkpoints:
        ckpt = Path(checkpoints).resolve()
        if ckpt == final.resolve() or final.resolve() in ckpt.parents:
            raise UsageError(
                f"--checkpoint-dir {checkpoints!r} is inside the run directory {str(final)!r}, which is "
                "written only when training has finished; pass a folder outside it"
            )
        outputs.check_writable(checkpoints, flag="--checkpoint-dir", into=True)

    threads, why = training.choose_threads(opts.threads)
    say(f"threads: {threads} ({why})")
    t = time.perf_counter()
    assert opts.data is not None  # options() refuses a run without DATA
    # a folder's images are decoded once into a disk-backed store, read per batch
    store_dir = scratch.enter_context(imagefolder.scratch_dir(final))
    data = imagefolder.load_data(opts.data, image_size, store_dir=store_dir)
    for line in imagefolder.skipped_lines(data.skipped, data.files, report.SKIPPED_FILE):
        report.warn(line)
    train_idx, val_idx = imagefolder.stratified_split(data.y, opts.validation_split, opts.seed)
    shown = ", ".join(data.class_names[:10]) + (", ..." if data.num_classes > 10 else "")
    say(
        f"data: {data.source}: {len(data)} samples, {data.num_classes} classes ({shown}); "
        f"{len(train_idx)} for training, {len(val_idx)} for validation ({time.perf_counter() - t:.1f} s)"
    )

    def as_input(idx, augment=None):
        if data.is_images:
            ds = imagefolder.ImageArrayDataset(data.x, data.y, mean, std, augment, indices=idx)
            return ds, None
        return data.x[idx], data.y[idx]

    if opts.augment and not data.is_images:
        raise imagefolder.InputError(
            f"--augment {','.join(opts.augment)} needs images; {data.source} holds float inputs"
        )
    x_tr, y_tr = as_input(train_idx, imagefolder.augmentation(opts.augment))
    val = None
    if len(val_idx):
        x_va, y_va = as_input(val_idx)
        val = x_va if y_va is None else (x_va, y_va)

    fl.seed_everything(opts.seed)
    if importing:
        model = build_import_model(spec, data.num_classes)
        base = model
        head_desc = f"`{spec}(num_classes={data.num_classes})`; its last leaf layer is the head"
    else:
        model, base = training.build_classifier(spec, data.num_classes, image_size)
        head = model.layers[-1].module
        head_desc = (
            f"`fl.Sequential([base, head])`: base = `fl.models.pretrained('{spec}', headless=True)`, "
            f"head = `nn.Linear({head.in_features}, {head.out_features})`"
        )
    report.check_output(final, need_bytes=report.expected_bytes(model.module))  # before training
    if checkpoints:  # the kept checkpoints and the one being written: weights + optimizer state
        ckpt_bytes = (KEPT_CHECKPOINTS + 1) * 3 * report.expected_bytes(model.module)
        outputs.check_writable(
            checkpoints, flag="--checkpoint-dir", need_bytes=ckpt_bytes, into=True
        )
    kind = "import" if importing else "zoo"
    if data.is_images:
        preprocessing = Preprocessing.for_images(
            data.class_names, image_size, mean, std, model=spec, kind=kind
        )
    else:
        preprocessing = Preprocessing.for_arrays(
            data.class_names, list(data.x.shape[1:]), model=spec, kind=kind
        )

    record = training.base_record("fit", command, torch.get_num_threads())
    record["title"] = f"frostline fit: {spec} on {data.source}"
    record["val_name"] = "validation"
    record["config"] = {k: v for k, v in vars(opts).items() if k != "flags"}
    record["skipped"] = [{"file": s.path, "reason": s.reason} for s in data.skipped]
    record["files_read"] = data.files
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
        + (f"; training images augmented: {', '.join(opts.augment)}" if opts.augment else "")
        if data.is_images
        else "none (float inputs used as given)",
    }
    record["model"] = {
        "name": model.name,
        "description": head_desc,
        "total_params": counts(model.module).total,
    }
    before = model.summary_text()
    say("\nBefore freezing:")
    say(before)
    selector = freeze_selector(
        base,
        freeze_all=opts.freeze_all,
        freeze=opts.freeze,
        freeze_type=opts.freeze_type,
        head_excluded=importing,
    )
    k = opts.unfreeze_last
    phase2 = bool(k and opts.epochs2)
    if opts.epochs2 and not k and "epochs2" in opts.flags:
        report.warn(
            "--epochs2 has no effect without --unfreeze-last K (phase 2 unfreezes the last K base layers)"
        )
    phase2_title = f"Summary after unfreezing the last {k} base layers (phase 2)"
    phases, recorder, result = training.train_two_phase(
        model,
        base,
        x_tr,
        y_tr,
        validation_data=val,
        freeze=selector,
        unfreeze=(k + 1 if importing else k) if phase2 else 1,
        epochs1=opts.epochs1,
        epochs2=opts.epochs2 if phase2 else 0,
        lr1=opts.lr1,
        lr2=opts.lr2,
        batch_size=opts.batch_size,
        seed=opts.seed,
        batchnorm=False if opts.batchnorm == "auto" else opts.batchnorm,
        titles=("base frozen as selected", f"+ last {k} base layers"),
        summary_titles=["Summary after freezing (phase 1)", phase2_title],
        headings=["After freezing:", None],
        verbose=0 if opts.quiet else "auto",
        print_fn=say,
        checkpoint_dir=checkpoints,
        resume=opts.resume,
        workers=opts.workers,
        # one set of cache options for both phases, carried unchanged to the engine
        cache_options=fl.CacheOptions(),
    )
    say()
    if recorder.resumed_at is not None:
        say(f"resumed from the checkpoint after epoch {recorder.resumed_at} in {opts.resume}")
        record["resumed"] = {"from": str(opts.resume), "after_epoch": recorder.resumed_at}
    for phase in phases:
        say(f"{phase['name']}: {phase['plan']}")
        say(training.describe_phase(phase, "validation"))
        say(f"  {phase['verification']}")
    record["phases"] = phases
    record["summaries"] = {"Summary before freezing": before, **recorder.summaries}
    acc = (phases[-1].get("val") or {}).get("accuracy")
    if acc is not None:
        record["conclusion"] = (
            f"**Validation accuracy after training: {100 * acc:.1f}% on {len(val_idx)} held-out samples.**"
        )
    record["freeze_note"] = (
        "Each bar is one leaf layer (a module that owns weights), in forward order, coloured by its trainable state."
    )
    leaves = training.merge_leaf_states(recorder.states)
    with report.RunDirectory(final) as run_dir:
        record["timings"] = {}
        training.write_run(run_dir.path, record, model, leaves, preprocessing)
        record["timings"].update(
            total_s=time.perf_counter() - t_start, cpu_s=time.process_time() - cpu_start
        )
        report.write_metrics(run_dir.path, record)
        report.write_report(run_dir.path / "report.md", record)
    if opts.quiet:
        print(final)
        return 0
    print(f"\nrun directory: {final}")
    print(
        f"total time: {time.perf_counter() - t_start:.1f} s wall, {time.process_time() - cpu_start:.1f} s CPU, {torch.get_num_threads()} thread(s)"
    )
    return 0
