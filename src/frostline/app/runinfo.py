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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from frostline.io.atomic import atomic_write_json

__all__ = ["FILE", "Preprocessing", "RunInfoError"]

FILE = "preprocessing.json"
FORMAT = "frostline.preprocessing"
VERSION = 1
MODEL_FILE = "model.safetensors"
#: the one resizing every app command uses (imagefolder.fit_square)
RESIZE = "center-crop to a square, then bicubic resize to image_size x image_size (Pillow)"


class RunInfoError(ValueError):
    """A run directory that cannot be used for predict/evaluate (one line, exit code 2)."""


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
        """The record of ``run_dir``; a missing or damaged one is a :class:`RunInfoError`."""
        run = Path(run_dir)
        if not run.is_dir():
            what = "is a file" if run.exists() else "does not exist"
            raise RunInfoError(
                f"run directory {str(run)!r} {what}; expected a folder written by 'frostline fit' or 'frostline demo'"
            )
        path = run / FILE
        if not path.is_file():
            raise RunInfoError(
                f"run directory {str(run)!r} has no {FILE} (the preprocessing its model was trained with); "
                "expected a run directory written by 'frostline fit' or 'frostline demo' of this version"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunInfoError(f"{str(path)!r} could not be read as JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RunInfoError(f"{str(path)!r} is not a frostline preprocessing record")
        if data.get("version") != VERSION:
            raise RunInfoError(
                f"{str(path)!r} has version {data.get('version')!r}; this frostline reads version {VERSION}"
            )
        try:
            info = cls(**{k: v for k, v in data.items() if k not in ("format", "version")})
        except TypeError as e:
            raise RunInfoError(f"{str(path)!r} has unexpected fields ({e})") from None
        info.check(str(path))
        if not (run / info.model.get("file", MODEL_FILE)).is_file():
            raise RunInfoError(
                f"run directory {str(run)!r} has no {info.model.get('file', MODEL_FILE)}; expected the trained model there"
            )
        return info

    def check(self, source: str) -> None:
        """Raise :class:`RunInfoError` when a field is missing or out of range."""

        def bad(what: str) -> RunInfoError:
            return RunInfoError(f"{source!r}: {what}")

        if self.input not in ("images", "arrays"):
            raise bad(f"input is {self.input!r}; expected 'images' or 'arrays'")
        names = self.class_names
        if not isinstance(names, list) or len(names) < 2 or len(set(map(str, names))) != len(names):
            raise bad(f"class_names {names!r} must list at least 2 distinct class names")
        if not isinstance(self.model, dict) or not isinstance(self.model.get("spec"), str):
            raise bad("model must record the zoo name or import path it was built from")
        if self.input == "images":
            if not isinstance(self.image_size, int) or self.image_size < 1:
                raise bad(f"image_size {self.image_size!r} must be a positive integer")
            for key in ("mean", "std"):
                v = getattr(self, key)
                if (
                    not isinstance(v, list)
                    or len(v) != self.channels
                    or not all(isinstance(t, int | float) and math.isfinite(t) for t in v)
                ):
                    raise bad(f"{key} {v!r} must be {self.channels} finite numbers")
            if any(s <= 0 for s in self.std or []):
                raise bad(f"std {self.std!r} must be positive")
        elif not isinstance(self.input_shape, list) or not self.input_shape:
            raise bad(f"input_shape {self.input_shape!r} must be a sample's shape")

    def trusted_modules(self) -> list[str]:
        """The package an import-path model's factory lives in (empty for zoo models)."""
        spec = self.model["spec"]
        return [spec.split(":")[0].split(".")[0]] if self.model.get("kind") == "import" else []


def _model_entry(spec: str, kind: str) -> dict[str, Any]:
    """``kind``: "zoo" (a zoo name) or "import" (a ``package.module:factory`` path)."""
    if kind not in ("zoo", "import"):
        raise ValueError(f"model kind must be 'zoo' or 'import', got {kind!r}")
    return {"file": MODEL_FILE, "spec": spec, "kind": kind}
