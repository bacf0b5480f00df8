"""What a model file may ask frostline to build: the allow-list, checked before anything is called.

A model file's ``architecture`` recipe is data written by whoever wrote the file.
:func:`blueprint` checks every part of it against this list, and only then returns a
:class:`Blueprint` that can call the constructors:

* ``layer``: a ``torch.nn`` layer class named by its exact path
  (``torch.nn.modules.linear.Linear``, see :mod:`frostline.api.nn_layers`), with keyword
  arguments its ``__init__`` names, valued by JSON scalars and lists;
* ``sequential``: frostline's Sequential container around such recipes (at most
  :data:`MAX_DEPTH` deep, :data:`MAX_ENTRIES` entries);
* ``zoo``: a zoo name (``efficientnet_lite0`` or an exact timm registry name), built
  without pretrained weights;
* ``import`` of ``timm:create_model`` or ``torchvision.models:get_model`` with a registry
  name (a builder may be named directly: ``torchvision.models:resnet18``,
  ``timm.models:resnet18``),
  built without weights, or of a ``torch.nn`` layer class (``torch.nn:Linear``);
  keyword arguments are limited to the architecture's own (:data:`TIMM_KWARGS`, the
  model class's constructor arguments, a torchvision builder's arguments), never one of
  :data:`REFUSED_KWARGS` (weights, checkpoints, pretrained configs, caches), and valued by
  JSON scalars and lists; torchvision's ``weights`` and ``weights_backbone`` are ``None``;
* ``import`` of ``package.module:callable`` only for a package the user trusts
  (``fl.load(path, trusted_modules=[...])``, ``--trust PACKAGE``), never frostline, torch,
  torchvision, timm or a standard-library module, as an exact path: no attribute chain, no
  ``_private`` part, and the callable a function or class defined in that package.

Nothing else is ever called. A request outside the list is an
:class:`~frostline.io.errors.UnsafeFileError` naming what was asked for; a recipe of the
wrong shape is a :class:`~frostline.io.errors.CheckpointError`.

>>> plan = blueprint({"kind": "layer", "class": "torch.nn.modules.linear.Linear",
...                   "kwargs": {"in_features": 2, "out_features": 3}}, ())
>>> plan.build(meta=True).weight.shape
torch.Size([3, 2])
>>> blueprint({"kind": "import", "target": "torch.hub:load", "args": ["x"]}, ())
Traceback (most recent call last):
...
frostline.io.errors.UnsafeFileError: refused: the architecture asks to call 'torch.hub:load'; a file may name only torch.nn layers, timm and torchvision models by registry name, and zoo names, and frostline never trusts all of 'torch'
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from frostline.api import nn_layers, zoo
from frostline.api.layer import SequentialModule
from frostline.io.errors import CheckpointError, UnsafeFileError

__all__ = [
    "BUILTIN_PACKAGES",
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_REGISTRY_INT",
    "REFUSED_KWARGS",
    "TIMM_KWARGS",
    "Blueprint",
    "ImportPathError",
    "blueprint",
    "check_trusted",
    "import_path",
]

BUILTIN_PACKAGES = ("frostline", "torch", "torchvision", "timm")
MAX_DEPTH = 32
MAX_ENTRIES = 100_000
MAX_REGISTRY_INT = 2**17
_MAX_STR = 1_000
_MAX_LIST = 4_096
_MAX_VALUE_DEPTH = 4

# Arguments that load, fetch or point at weights, code, configs or files: never from a file.
REFUSED_KWARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_model_args",
        "pretrained_strict",
        "pretrained_filter_fn",
        "checkpoint_path",
        "cache_dir",
        "kwargs_filter",
        "model_cfg",
        "feature_cfg",
        "feature_cls",
        "pruned",
        "scriptable",
        "exportable",
        "no_jit",
        "model_name",
        "progress",
        "quantize",
        "device",
        "dtype",
    }
)
# timm arguments the builders take beside the model class's own.
TIMM_KWARGS = frozenset(
    {
        "num_classes",
        "in_chans",
        "img_size",
        "global_pool",
        "drop_rate",
        "drop_path_rate",
        "drop_block_rate",
        "attn_drop_rate",
        "proj_drop_rate",
        "pos_drop_rate",
        "patch_drop_rate",
        "features_only",
        "out_indices",
        "output_stride",
        "bn_eps",
        "bn_momentum",
        "pad_type",
    }
)
_TIMM_TARGET = "timm:create_model"
_TORCHVISION_TARGET = "torchvision.models:get_model"
_ALLOWED = (
    "a file may name only torch.nn layers, timm and torchvision models by registry name, "
    "and zoo names"
)


# -- errors ------------------------------------------------------------------------------
def _refused(asked: str, why: str) -> UnsafeFileError:
    return UnsafeFileError(f"refused: the architecture asks {asked}; {why}")


def _malformed(what: str) -> CheckpointError:
    return CheckpointError(f"malformed architecture: {what}")


def _trust_hint(root: str) -> str:
    return (
        f"if you trust package {root!r}, load with fl.load(path, trusted_modules=[{root!r}]) "
        f"(command line: --trust {root})"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# -- import paths the user names ------------------------------------------------------------
class ImportPathError(ValueError):
    """An import path that does not name an importable callable, or names an untrusted package."""


def import_path(target: str, trusted: Sequence[str] | None = None) -> Callable:
    """The callable that ``"package.module:attr"`` names: frostline's one import-path resolver.

    For paths the user writes (``--model pkg.mod:build``, ``fl.saving.build``); a path read
    from a file goes through :func:`blueprint`. With ``trusted``, only a target whose
    top-level package is listed is imported. Errors (:class:`ImportPathError`) say which
    part failed.

    >>> import_path("torch.nn:Linear").__name__
    'Linear'
    >>> import_path("os.path:join", trusted=["torch"])
    Traceback (most recent call last):
    ...
    frostline.api.allowlist.ImportPathError: 'os.path:join' is in package 'os', which is not trusted (trusted: torch)
    """
    if not isinstance(target, str) or target.count(":") != 1 or "" in target.split(":"):
        raise ImportPathError(
            f"{target!r} is not an import path; expected 'package.module:factory'"
        )
    mod_name, attr = target.split(":")
    root = mod_name.split(".")[0]
    if trusted is not None and root not in trusted:
        raise ImportPathError(
            f"{target!r} is in package {root!r}, which is not trusted (trusted: {', '.join(trusted)})"
        )
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportPathError(f"cannot import module {mod_name!r} ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportPathError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ImportPathError(f"{target!r} is a {type(obj).__name__}, not a callable")
    return obj


# -- trust -------------------------------------------------------------------------------
def check_trusted(names: str | Sequence[str]) -> tuple[str, ...]:
    """The packages a user trusts, checked: top-level names, none of frostline's own or Python's.

    >>> check_trusted(["mypkg"])
    ('mypkg',)
    >>> check_trusted(["torch"])
    Traceback (most recent call last):
    ...
    ValueError: trusted_modules cannot name 'torch': frostline already builds torch.nn layers and timm/torchvision registry models from a file, and never trusts a whole package that holds torch.load, torch.hub.load and the like
    """
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Sequence):
        raise TypeError(
            f"trusted_modules must be a list of package names, got {type(names).__name__}"
        )
    out = []
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(
                f"trusted_modules holds top-level package names such as 'mypkg', got {name!r}"
            )
        if name in BUILTIN_PACKAGES:
            raise ValueError(
                f"trusted_modules cannot name {name!r}: frostline already builds torch.nn layers and "
                "timm/torchvision registry models from a file, and never trusts a whole package "
                "that holds torch.load, torch.hub.load and the like"
            )
        if name in sys.stdlib_module_names or name == "builtins":
            raise ValueError(
                f"trusted_modules cannot name {name!r}: it is part of Python's standard library, "
                "not a package of model factories"
            )
        out.append(name)
    return tuple(out)


# -- values ------------------------------------------------------------------------------
def _check_value(value: Any, where: str, *, dicts: bool, depth: int = 0) -> None:
    """JSON data only: scalars and lists (and dicts, for a trusted package's factory)."""
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _malformed(f"{where} is {value!r}; expected a finite number")
        return
    if isinstance(value, str):
        if len(value) > _MAX_STR:
            raise _malformed(f"{where} is a string of {len(value)} characters (at most {_MAX_STR})")
        return
    if depth >= _MAX_VALUE_DEPTH:
        raise _malformed(f"{where} is nested deeper than {_MAX_VALUE_DEPTH} levels")
    if isinstance(value, list):
        if len(value) > _MAX_LIST:
            raise _malformed(f"{where} is a list of {len(value)} items (at most {_MAX_LIST})")
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]", dicts=dicts, depth=depth + 1)
        return
    if dicts and isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _malformed(f"{where} has a key {k!r}; expected strings")
            _check_value(v, f"{where}[{k!r}]", dicts=dicts, depth=depth + 1)
        return
    kinds = "JSON values" if dicts else "numbers, strings, booleans, null or lists of them"
    raise _malformed(f"{where} is a {type(value).__name__} ({_short(value)}); expected {kinds}")


def _kwargs_of(recipe: Mapping[str, Any], where: str) -> dict[str, Any]:
    kwargs = recipe.get("kwargs", {})
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise _malformed(f"{where} kwargs is a {type(kwargs).__name__}; expected an object")
    for k in kwargs:
        if not isinstance(k, str) or not k.isidentifier():
            raise _malformed(f"{where} has a keyword {_short(k)}; expected a Python name")
    return dict(kwargs)


def _args_of(recipe: Mapping[str, Any], where: str) -> list[Any]:
    args = recipe.get("args", [])
    if args is None:
        return []
    if not isinstance(args, list):
        raise _malformed(f"{where} args is a {type(args).__name__}; expected a list")
    return list(args)


def _check_sizes(value: Any, where: str) -> None:
    """Registry builders loop over sizes in Python (a ``depth`` of 10**7 takes minutes even on
    the meta device), so their integers are bounded."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_sizes(v, f"{where}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_REGISTRY_INT:
        raise _malformed(
            f"{where} is {value}; registry model arguments are at most {MAX_REGISTRY_INT}"
        )


def _check_keywords(
    kwargs: Mapping[str, Any], allowed: Callable[[str], bool], asked: str, where: str
) -> None:
    for k, v in kwargs.items():
        if k.startswith("_") or k in REFUSED_KWARGS:
            raise _refused(
                f"for {asked} with {k}={_short(v)}",
                "a file never sets a private argument or one that loads weights, checkpoints, "
                "configs or code",
            )
        if not allowed(k):
            raise _refused(
                f"for {asked} with {k}={_short(v)}",
                f"{k!r} is not an argument of {asked}",
            )
        _check_value(v, f"{where} argument {k!r}", dicts=False)


# -- the blueprint -----------------------------------------------------------------------
class _OverBudget(BaseException):
    """Raised inside a constructor that makes more modules than the file could fill."""


@contextlib.contextmanager
def _module_budget(limit: int) -> Iterator[None]:
    """Abort a build in this thread after ``limit`` submodule registrations."""
    me = threading.get_ident()
    count = [0]

    def hook(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        if threading.get_ident() == me:
            count[0] += 1
            if count[0] > limit:
                raise _OverBudget

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Blueprint:
    """A checked architecture recipe: what it builds (in words) and the call that builds it.

    ``user_code`` is True when building calls into a package the user trusts.

    >>> plan = blueprint({"kind": "zoo", "name": "resnet10t", "kwargs": {"num_classes": 3}}, ())
    >>> plan.what, type(plan.build(meta=True)).__name__
    ("zoo model 'resnet10t'", 'ResNet')
    """

    what: str
    make: Callable[[], Any]
    user_code: bool = False

    def _call(self, meta: bool, max_modules: int | None) -> nn.Module:
        with contextlib.ExitStack() as stack:
            if meta:
                stack.enter_context(torch.device("meta"))
            if max_modules is not None:
                stack.enter_context(_module_budget(max_modules))
            module = self.make()
        if not isinstance(module, nn.Module):
            raise TypeError(f"it returned a {type(module).__name__}, not a torch.nn.Module")
        return module

    def _failed(self, err: BaseException, source: str, max_modules: int | None) -> CheckpointError:
        where = f"{source}: " if source else ""
        if isinstance(err, _OverBudget):
            return CheckpointError(
                f"{where}building {self.what} made more than {max_modules} modules, more than "
                "the file's tensors could fill"
            )
        return CheckpointError(
            f"{where}{self.what} could not be built: {type(err).__name__}: {_one_line(err)}"
        )

    def build(
        self, *, meta: bool = False, max_modules: int | None = None, source: str = ""
    ) -> nn.Module:
        """Call the constructors (on the meta device: no memory is allocated).

        A failure, a result that is not a module, or more than ``max_modules`` submodules
        is a :class:`CheckpointError` (its message starts with ``source``).
        """
        try:
            return self._call(meta, max_modules)
        except (Exception, _OverBudget) as e:
            raise self._failed(e, source, max_modules) from None

    def rebuild(
        self, fits: Callable[[nn.Module], None], *, max_modules: int, source: str = ""
    ) -> nn.Module:
        """Build for real once a meta-device build passed ``fits`` (raising when the module
        does not match the file), so a recipe that does not fit takes no memory. A
        constructor that cannot run on meta is built for real and then checked; the user's
        own factory (``user_code``) is called once, as they wrote it.
        """
        if self.user_code:
            module = self.build(source=source)
        else:
            try:
                fits(self._call(True, max_modules))
                return self.build(source=source)
            except _OverBudget as e:
                raise self._failed(e, source, max_modules) from None
            except CheckpointError:
                raise
            except Exception:  # it reads tensor values (no meta support): build it for real
                module = self.build(max_modules=max_modules, source=source)
        fits(module)
        return module


def blueprint(recipe: Any, trusted: Sequence[str]) -> Blueprint:
    """Check an architecture recipe against the allow-list; nothing it names is called yet.

    ``trusted``: the packages the user trusts (see :func:`check_trusted`). Raises
    :class:`UnsafeFileError` for anything outside the allow-list and
    :class:`CheckpointError` for a recipe of the wrong shape.

    >>> blueprint({"kind": "import", "target": "timm:create_model", "args": ["resnet10t"],
    ...            "kwargs": {"pretrained": True}}, ())
    Traceback (most recent call last):
    ...
    frostline.io.errors.UnsafeFileError: refused: the architecture asks for timm model 'resnet10t' with pretrained=True; a file never sets a private argument or one that loads weights, checkpoints, configs or code
    """
    return _blueprint(recipe, tuple(trusted), 0, [0])


def _blueprint(recipe: Any, trusted: tuple[str, ...], depth: int, counter: list[int]) -> Blueprint:
    if depth > MAX_DEPTH:
        raise _malformed(f"sequential recipes nest deeper than {MAX_DEPTH} levels")
    counter[0] += 1
    if counter[0] > MAX_ENTRIES:
        raise _malformed(f"more than {MAX_ENTRIES} layers")
    if not isinstance(recipe, dict):
        raise _malformed(f"a recipe is a {type(recipe).__name__}; expected an object")
    kind = recipe.get("kind")
    if kind == "layer":
        return _layer_recipe(recipe)
    if kind == "sequential":
        return _sequential(recipe, trusted, depth, counter)
    if kind == "zoo":
        return _zoo(recipe)
    if kind == "import":
        return _import(recipe, trusted)
    raise _malformed(f"unknown kind {_short(kind)}; expected layer, sequential, zoo or import")


# -- torch.nn layers ----------------------------------------------------------------------
def _layer(cls: type[nn.Module], args: list[Any], kwargs: dict[str, Any]) -> Blueprint:
    asked = f"torch.nn.{cls.__name__}"
    params = nn_layers.constructor_params(cls)
    positional = [
        p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(positional):
        raise _malformed(f"{asked} takes at most {len(positional)} positional arguments")
    for i, v in enumerate(args):
        _check_value(v, f"{asked} argument {i}", dicts=False)
    _check_keywords(kwargs, params.__contains__, asked, asked)
    return Blueprint(asked, lambda: cls(*args, **kwargs))


def _layer_recipe(recipe: dict) -> Blueprint:
    path = recipe.get("class")
    cls = nn_layers.layer_class(path)
    if cls is None:
        raise _refused(f"for layer class {_short(path)}", _ALLOWED)
    return _layer(cls, [], _kwargs_of(recipe, "layer"))


# -- sequential ----------------------------------------------------------------------------
def _sequential(
    recipe: dict, trusted: tuple[str, ...], depth: int, counter: list[int]
) -> Blueprint:
    layers = recipe.get("layers")
    if not isinstance(layers, list):
        raise _malformed(f"sequential layers is a {type(layers).__name__}; expected a list")
    children: list[tuple[str, Blueprint]] = []
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise _malformed(
                f"sequential entry {i} is a {type(entry).__name__}; expected an object"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not name or "." in name or len(name) > _MAX_STR:
            raise _malformed(f"sequential entry {i} has the name {_short(name)}")
        children.append((name, _blueprint(entry.get("layer"), trusted, depth + 1, counter)))

    def make() -> nn.Module:
        seq = SequentialModule()
        for name, child in children:
            seq.add_module(name, child.make())
        return seq

    return Blueprint(
        f"a Sequential of {len(children)} layers", make, any(c.user_code for _, c in children)
    )


# -- registries ---------------------------------------------------------------------------
def _timm_class_params(name: str) -> frozenset[str]:
    """The constructor arguments of the class timm builds for ``name`` (built on meta)."""
    import timm

    try:
        with torch.device("meta"):
            built = timm.create_model(name, pretrained=False)
    except Exception:
        return frozenset()
    return frozenset(nn_layers.constructor_params(type(built)))


def _timm_keywords(name: str, kwargs: Mapping[str, Any], asked: str) -> None:
    cache: list[frozenset[str]] = []

    def allowed(k: str) -> bool:
        if k in TIMM_KWARGS:
            return True
        if not cache:
            cache.append(_timm_class_params(name))
        return k in cache[0]

    _check_keywords(kwargs, allowed, asked, asked)
    for k, v in kwargs.items():
        _check_sizes(v, f"{asked} argument {k!r}")


def _timm(name: Any, kwargs: dict[str, Any]) -> Blueprint:
    if not zoo.is_known_name(name):
        raise _refused(f"for timm model {_short(name)}", "it is not a name in timm's registry")
    asked = f"timm model {name!r}"
    _timm_keywords(name, kwargs, asked)

    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return Blueprint(asked, make)


def _zoo(recipe: dict) -> Blueprint:
    name = recipe.get("name")
    if not isinstance(name, str) or not zoo.is_known_name(name):
        raise _refused(f"for zoo model {_short(name)}", "it is not a zoo or timm registry name")
    asked = f"zoo model {name!r}"
    kwargs = _kwargs_of(recipe, "zoo")
    own = {k: kwargs.pop(k) for k in ("num_classes", "headless") if k in kwargs}
    if own.get("num_classes") is not None and (
        isinstance(own["num_classes"], bool) or not isinstance(own["num_classes"], int)
    ):
        raise _malformed(f"{asked} num_classes is {_short(own['num_classes'])}")
    if not isinstance(own.get("headless", False), bool):
        raise _malformed(f"{asked} headless is {_short(own['headless'])}")
    _timm_keywords(name, kwargs, asked)
    return Blueprint(asked, lambda: zoo.create_module(name, pretrained=False, **own, **kwargs))


def _torchvision(name: Any, kwargs: dict[str, Any]) -> Blueprint:
    import torchvision.models as tvm  # type: ignore[import-untyped]

    if not isinstance(name, str) or name not in tvm.list_models():
        raise _refused(
            f"for torchvision model {_short(name)}", "it is not a name in torchvision's registry"
        )
    asked = f"torchvision model {name!r}"
    builder = tvm.get_model_builder(name)
    own = dict(inspect.signature(builder).parameters)
    cls = inspect.signature(builder).return_annotation
    if isinstance(cls, str):
        cls = vars(sys.modules[builder.__module__]).get(cls)
    allowed = {k for k in own if k not in ("weights", "weights_backbone", "kwargs")}
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        allowed |= set(nn_layers.constructor_params(cls))
    for k in ("weights", "weights_backbone"):
        if kwargs.get(k) is not None:
            raise _refused(
                f"for {asked} with {k}={_short(kwargs[k])}",
                "a file never names weights to download; they come from the file itself",
            )
    rest = {k: v for k, v in kwargs.items() if k not in ("weights", "weights_backbone")}
    _check_keywords(rest, allowed.__contains__, asked, asked)
    for k, v in rest.items():
        _check_sizes(v, f"{asked} argument {k!r}")
    none = {"weights": None}
    if "weights_backbone" in own:  # detection and segmentation builders default to downloading
        none["weights_backbone"] = None
    return Blueprint(asked, lambda: tvm.get_model(name, **none, **rest))


# -- import paths -------------------------------------------------------------------------
def _registry_name(args: list[Any], asked: str) -> Any:
    if len(args) != 1:
        raise _malformed(f"{asked} takes one positional argument, the registry name")
    return args[0]


def _import(recipe: dict, trusted: tuple[str, ...]) -> Blueprint:
    target = recipe.get("target")
    if not isinstance(target, str) or target.count(":") != 1 or len(target) > _MAX_STR:
        raise _malformed(f"import target {_short(target)}; expected 'package.module:factory'")
    args, kwargs = _args_of(recipe, "import"), _kwargs_of(recipe, "import")
    if target == _TIMM_TARGET:
        return _timm(_registry_name(args, target), kwargs)
    if target == _TORCHVISION_TARGET:
        return _torchvision(_registry_name(args, target), kwargs)
    mod, attr = target.split(":")
    if mod == "torchvision.models" and not args:
        import torchvision.models as tvm  # type: ignore[import-untyped]

        if attr in tvm.list_models():
            return _torchvision(attr, kwargs)
    if (mod == "timm" or mod == "timm.models" or mod.startswith("timm.models.")) and not args:
        import timm

        if attr in timm.list_models():  # a timm entrypoint: what timm.create_model(attr) calls
            return _timm(attr, kwargs)
    if mod == "torch.nn" or mod.startswith("torch.nn.modules."):
        cls = nn_layers.layer_by_name(attr)
        if cls is not None and mod in ("torch.nn", cls.__module__):
            return _layer(cls, args, kwargs)
    root = mod.split(".")[0]
    asked = f"to call {target!r}"
    if root in BUILTIN_PACKAGES:
        raise _refused(asked, f"{_ALLOWED}, and frostline never trusts all of {root!r}")
    if root in sys.stdlib_module_names or root == "builtins":
        raise _refused(asked, f"{_ALLOWED}, and never Python's standard library")
    if root not in trusted:
        raise _refused(asked, f"{_ALLOWED}; {_trust_hint(root)}")
    factory = _trusted_callable(target, root)
    _check_value(args, f"{target!r} args", dicts=True)
    _check_value(kwargs, f"{target!r} kwargs", dicts=True)
    return Blueprint(repr(target), lambda: factory(*args, **kwargs), user_code=True)


def _trusted_callable(target: str, root: str) -> Callable[..., Any]:
    """The function or class ``target`` names in the trusted package ``root``: exact, public."""
    mod, attr = target.split(":")
    parts = [*mod.split("."), attr]
    if not all(p.isidentifier() and not p.startswith("_") for p in parts):
        raise _refused(
            f"to call {target!r}",
            "a trusted package is followed only as an exact 'package.module:callable' "
            "(no attribute chain, no _private name)",
        )
    try:
        obj = import_path(target, (root,))
    except ImportPathError as e:
        why = "cannot be imported" if "cannot import" in str(e) else "does not resolve"
        raise CheckpointError(f"the architecture names {target!r}, but it {why}: {e}") from None
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        raise _refused(
            f"to call {target!r}",
            f"it is a {type(obj).__name__}; only functions and classes are called",
        )
    defined_in = getattr(obj, "__module__", None) or ""
    if defined_in.split(".")[0] != root:
        raise _refused(
            f"to call {target!r}",
            f"it is defined in {defined_in!r}, not in the trusted package {root!r}",
        )
    return obj
