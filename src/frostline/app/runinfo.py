"""What a run directory records so that ``predict`` and ``evaluate`` prepare inputs as ``fit`` did.

``frostline fit`` and ``frostline demo`` write ``preprocessing.json`` next to
``model.safetensors``: the kind of input (images or ready-made arrays), the image
size, channels and resizing, the normalisation mean and std, the class names in label
order, and how the model is rebuilt. ``predict`` and ``evaluate`` read it and never
guess any of it.

>>> import tempfile, pathlib
>>> run = pathlib.Path(tempfile.mkdtemp())
>>> info = Preprocessing.for_images(["cat", "dog"], 32, (0.5,) * 3, (0.5,) * 3, model="efficientnet_lite0")
>>> info.write(run)
>>> _ = (run / "model.safetensors").write_bytes(b"")  # fit writes the model beside it
>>> Preprocessing.read(run).class_names
['cat', 'dog']
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeGuard

from frostline.io.atomic import atomic_write_json

__all__ = [
    "FILE",
    "MAX_CLASSES",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "Preprocessing",
    "RunInfoError",
    "RunInfoMissing",
    "file_inside",
]

FILE = "preprocessing.json"
FORMAT = "frostline.preprocessing"
VERSION = 1
MODEL_FILE = "model.safetensors"
#: the one resizing every app command uses (imagefolder.fit_square)
RESIZE = "center-crop to a square, then bicubic resize to image_size x image_size (Pillow)"


#: the image sides (pixels) a run or a flag may ask for
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096
#: at most this many classes (a record listing more is damaged)
MAX_CLASSES = 100_000
#: an array sample: at most this many dimensions and values
MAX_DIMS, MAX_SAMPLE_ELEMENTS = 8, 1 << 26
#: a preprocessing.json larger than this is not one (100,000 class names fit)
MAX_RECORD_BYTES = 16 << 20


class RunInfoError(ValueError):
    """A run directory that cannot be used for predict/evaluate (one line, exit code 2)."""


class RunInfoMissing(RunInfoError):
    """A file a run directory should hold is not there (``name``: the name looked for)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def _shown(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters, for one-line messages about a file's values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(e: BaseException) -> str:
    return _shown(" ".join(str(e).split()) or type(e).__name__, 120).strip("'\"")


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def file_inside(run_dir: Path, name: Any, what: str) -> Path:
    """``run_dir/name`` resolved, after checking that it stays inside ``run_dir`` and is a regular file.

    ``name`` must be a relative path without ``..``; following symbolic links, it must
    end inside ``run_dir`` at a regular file (not a folder, FIFO or device). A missing
    file is a :class:`RunInfoMissing`; anything else wrong a :class:`RunInfoError`.

    >>> import tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (run / "model.safetensors").write_bytes(b"")
    >>> file_inside(run, "model.safetensors", "model.file").name
    'model.safetensors'
    >>> file_inside(run, "../x", "model.file")
    Traceback (most recent call last):
    ...
    frostline.app.runinfo.RunInfoError: model.file '../x' must name a file inside the run directory (a relative path without '..')
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise RunInfoError(
            f"{what} is {_shown(name)}; expected the name of a file in the run directory"
        )
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or rel.drive:
        raise RunInfoError(
            f"{what} {name!r} must name a file inside the run directory (a relative path without '..')"
        )
    root = run_dir.resolve()
    target = (run_dir / rel).resolve()
    if not target.is_relative_to(root):
        raise RunInfoError(
            f"{what} {str(run_dir / rel)!r} is a symbolic link to {str(target)!r}, outside the run "
            f"directory; expected a file inside {str(run_dir)!r}"
        )
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise RunInfoMissing(f"{str(run_dir / rel)!r} does not exist", name) from None
    except OSError as e:
        raise RunInfoError(f"{what} {str(run_dir / rel)!r} cannot be read ({_short(e)})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise RunInfoError(f"{what} {str(run_dir / rel)!r} is {kind}; expected a regular file")
    return target


@dataclass
class Preprocessing:
    """The inputs a trained run expects, as ``preprocessing.json`` records them."""

    input: str  # "images": uint8 pictures resized and normalised; "arrays": floats used as given
    class_names: list[str]
    model: dict[str, Any]
    image_size: int | None = None
    channels: int = 3
    color: str | None = "RGB"
    resize: str | None = RESIZE
    scale: float | None = 1 / 255
    mean: list[float] | None = None
    std: list[float] | None = None
    input_shape: list[int] | None = None  # arrays: one sample's shape
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_images(
        cls,
        class_names: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        model: str,
        kind: str = "zoo",
    ) -> Preprocessing:
        """Images: RGB, centre-cropped and resized to ``image_size``, ``(x / 255 - mean) / std``."""
        return cls(
            input="images",
            class_names=[str(c) for c in class_names],
            model=_model_entry(model, kind),
            image_size=int(image_size),
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
        )

    @classmethod
    def for_arrays(
        cls,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        model: str,
        kind: str = "zoo",
    ) -> Preprocessing:
        """Float arrays of one sample shape, used as given."""
        return cls(
            input="arrays",
            class_names=[str(c) for c in class_names],
            model=_model_entry(model, kind),
            channels=int(input_shape[0]) if input_shape else 0,
            color=None,
            resize=None,
            scale=None,
            input_shape=[int(s) for s in input_shape],
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def write(self, run_dir: str | os.PathLike) -> None:
        """``run_dir/preprocessing.json`` (atomic)."""
        atomic_write_json(Path(run_dir) / FILE, self.to_json())

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> Preprocessing:
        """The record of ``run_dir``; a missing, damaged or out-of-range one is a :class:`RunInfoError`.

        Every field is checked (:meth:`check`), and every file the record names must be a
        regular file inside ``run_dir`` (:func:`file_inside`).
        """
        run = Path(run_dir)
        if not run.is_dir():
            what = "is a file" if run.exists() else "does not exist"
            raise RunInfoError(
                f"run directory {str(run)!r} {what}; expected a folder written by 'frostline fit' or 'frostline demo'"
            )
        try:
            path = file_inside(run, FILE, "the preprocessing record")
        except RunInfoMissing:
            raise RunInfoError(
                f"run directory {str(run)!r} has no {FILE} (the preprocessing its model was trained with); "
                "expected a run directory written by 'frostline fit' or 'frostline demo' of this version"
            ) from None
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise RunInfoError(
                f"{str(run / FILE)!r} holds {path.stat().st_size:,} bytes; a preprocessing record is "
                f"at most {MAX_RECORD_BYTES:,}"
            )
        source = str(run / FILE)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RunInfoError(f"{source!r} could not be read as JSON ({_short(e)})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RunInfoError(f"{source!r} is not a frostline preprocessing record")
        if data.get("version") != VERSION:
            raise RunInfoError(
                f"{source!r} has version {_shown(data.get('version'))}; this frostline reads version {VERSION}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known | {"format", "version"})
        if unknown:
            raise RunInfoError(
                f"{source!r} has unexpected field(s) {', '.join(map(repr, unknown[:5]))}; "
                f"expected only {', '.join(sorted(known))}"
            )
        missing = sorted(k for k in ("input", "class_names", "model") if k not in data)
        if missing:
            raise RunInfoError(f"{source!r} lacks the field(s) {', '.join(map(repr, missing))}")
        info = cls(**{k: v for k, v in data.items() if k not in ("format", "version")})
        info.check(source)
        info.model_file(run)
        return info

    def model_file(self, run_dir: str | os.PathLike) -> Path:
        """The model's weights: ``model.file``, a regular file inside ``run_dir`` (resolved)."""
        run = Path(run_dir)
        try:
            return file_inside(run, self.model.get("file", MODEL_FILE), "model.file")
        except RunInfoMissing as e:
            raise RunInfoError(
                f"run directory {str(run)!r} has no {e.name}; expected the trained model there"
            ) from None

    def check(self, source: str) -> None:
        """Raise :class:`RunInfoError` when a field is missing, of the wrong type or out of range.

        >>> info = Preprocessing.for_images(["a", "b"], 32, (0.5,) * 3, (0.5,) * 3, model="m")
        >>> info.channels = 1
        >>> info.check("p.json")
        Traceback (most recent call last):
        ...
        frostline.app.runinfo.RunInfoError: 'p.json': channels is 1; images are recorded with channels 3 (RGB)
        """

        def bad(what: str) -> RunInfoError:
            return RunInfoError(f"{source!r}: {what}")

        if self.input not in ("images", "arrays"):
            raise bad(f"input is {_shown(self.input)}; expected 'images' or 'arrays'")
        names = self.class_names
        if (
            not isinstance(names, list)
            or not 2 <= len(names) <= MAX_CLASSES
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise bad(
                f"class_names {_shown(names)} must list 2 to {MAX_CLASSES:,} distinct, non-empty class names"
            )
        model = self.model
        if (
            not isinstance(model, dict)
            or not isinstance(model.get("spec"), str)
            or not model["spec"]
        ):
            raise bad(
                f"model {_shown(model)} must record the zoo name or import path it was built from "
                '({"spec": ..., "kind": "zoo" or "import", "file": "model.safetensors"})'
            )
        strange = sorted(str(k) for k in model if k not in ("spec", "kind", "file"))
        if strange:
            raise bad(f"model has unexpected key(s) {', '.join(map(repr, strange))}")
        if model.get("kind", "zoo") not in ("zoo", "import"):
            raise bad(f"model.kind is {_shown(model.get('kind'))}; expected 'zoo' or 'import'")
        if not isinstance(model.get("file", MODEL_FILE), str):
            raise bad(
                f"model.file is {_shown(model.get('file'))}; expected the name of a file in the run directory"
            )
        if not isinstance(self.extra, dict):
            raise bad(f"extra is {_shown(self.extra)}; expected a table")
        if self.input == "images":
            self._check_images(bad)
        else:
            self._check_arrays(bad)

    def _check_images(self, bad: Any) -> None:
        size = self.image_size
        if not _is_int(size) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
            raise bad(
                f"image_size is {_shown(size)}; expected an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (pixels)"
            )
        if self.channels != 3 or isinstance(self.channels, bool):
            raise bad(
                f"channels is {_shown(self.channels)}; images are recorded with channels 3 (RGB)"
            )
        if self.color != "RGB":
            raise bad(f"color is {_shown(self.color)}; images are recorded as 'RGB'")
        if self.resize != RESIZE:
            raise bad(
                f"resize is {_shown(self.resize)}; this frostline resizes one way: {RESIZE!r}"
            )
        if not _is_number(self.scale) or not math.isclose(self.scale, 1 / 255, rel_tol=1e-6):
            raise bad(f"scale is {_shown(self.scale)}; images are scaled by 1/255")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not isinstance(v, list) or len(v) != 3 or not all(_is_number(t) for t in v):
                raise bad(f"{key} is {_shown(v)}; expected 3 finite numbers (one per RGB channel)")
        if any(s <= 0 for s in self.std or []):
            raise bad(f"std is {_shown(self.std)}; expected 3 positive numbers")
        if self.input_shape is not None:
            raise bad(
                f"input_shape is {_shown(self.input_shape)}; images record image_size instead"
            )

    def _check_arrays(self, bad: Any) -> None:
        shape = self.input_shape
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= MAX_DIMS
            or not all(_is_int(d) and d >= 1 for d in shape)
            or math.prod(shape) > MAX_SAMPLE_ELEMENTS
        ):
            raise bad(
                f"input_shape is {_shown(shape)}; expected a sample's shape: 1 to {MAX_DIMS} positive "
                f"integers, at most {MAX_SAMPLE_ELEMENTS:,} values in all"
            )
        if self.channels != shape[0] or isinstance(self.channels, bool):
            raise bad(f"channels is {_shown(self.channels)}; expected input_shape[0], {shape[0]}")
        for key in ("image_size", "color", "resize", "scale", "mean", "std"):
            if getattr(self, key) is not None:
                raise bad(f"{key} is {_shown(getattr(self, key))}; arrays are used as given (null)")

    def trusted_modules(self) -> list[str]:
        """The package an import-path model's factory lives in (empty for zoo models, and for
        torch/torchvision/timm builders, which ``fl.load`` builds from its allow-list)."""
        from frostline.api.allowlist import BUILTIN_PACKAGES

        spec = self.model["spec"]
        root = spec.split(":")[0].split(".")[0]
        return [root] if self.model.get("kind") == "import" and root not in BUILTIN_PACKAGES else []


def _model_entry(spec: str, kind: str) -> dict[str, Any]:
    """``kind``: "zoo" (a zoo name) or "import" (a ``package.module:factory`` path)."""
    if kind not in ("zoo", "import"):
        raise ValueError(f"model kind must be 'zoo' or 'import', got {kind!r}")
    return {"file": MODEL_FILE, "spec": spec, "kind": kind}
