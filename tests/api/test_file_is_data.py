"""A model file is data: crafted files run nothing, import nothing, write nothing on load.

Every crafted file is written the way an attacker would write it: the safetensors header
JSON by hand, with frostline's integrity digest recomputed (a digest anyone can compute is
not a signature). Each is loaded in a child process (``_file_is_data_harness.py``) whose
working directory holds ``evilmod.py`` (it leaves a marker file when imported), under a
``sys.addaudithook`` hook that records code execution, imports, unpickling, writes,
process spawns, sockets and native libraries. A crafted file must be refused with a typed
frostline error, one line, with no such event and no marker; genuine files (their digest
dropped) still load with no event.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import frostline as fl

HARNESS = Path(__file__).with_name("_file_is_data_harness.py")
TYPED = {"CheckpointError", "UnsafeFileError"}
MARKERS = "MARKER-*"
SELF_CHECK = "harness_self_check"


# -- files as an attacker writes them ------------------------------------------------------
def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """frostline's content digest, recomputed from its published format."""
    desc = json.dumps(
        {
            "tensors": [[n, "F32", list(t.shape)] for n, t in sorted(tensors.items())],
            "metadata": sorted(metadata.items()),
        },
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    h = hashlib.sha256(b"frostline-safetensors-digest-v1\n")
    h.update(len(desc).to_bytes(8, "little"))
    h.update(desc)
    for _, t in sorted(tensors.items()):
        h.update(t.numpy().tobytes())
    return "frostline-sha256-v1:" + h.hexdigest()


def write_raw(
    path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor], digest: bool
) -> Path:
    """A safetensors file with this header metadata (float32 tensors), header JSON by hand."""
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    md = dict(metadata)
    if digest:
        md["frostline.digest"] = md["frostline.digest.check"] = _digest(tensors, metadata)
    header: dict = {"__metadata__": md}
    data, offset = b"", 0
    for name, t in sorted(tensors.items()):
        raw = t.numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data += raw
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def craft(path: Path, architecture, *, tensors=None, digest: bool = True, **meta_fields) -> Path:
    """A frostline model file whose metadata records ``architecture``."""
    meta = {
        "format": "frostline.model",
        "version": 1,
        "frostline_version": fl.__version__,
        "name": "m",
        "class": "Model",
        "architecture": architecture,
        "trainable": {},
        **meta_fields,
    }
    tensors = {"w": torch.zeros(1)} if tensors is None else tensors
    return write_raw(path, {"frostline_model": json.dumps(meta)}, tensors, digest)


def redigest(src: Path, dst: Path, *, digest: bool, meta_edit=None) -> Path:
    """``src``'s tensors and metadata rewritten by hand, the digest dropped or recomputed."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        md = {k: v for k, v in (f.metadata() or {}).items() if not k.startswith("frostline.")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
    if meta_edit is not None:
        meta = json.loads(md["frostline_model"])
        md["frostline_model"] = json.dumps(meta_edit(meta))
    return write_raw(dst, md, tensors, digest)


# -- the sandbox ---------------------------------------------------------------------------
EVILMOD = """
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "MARKER-evilmod"), "w").close()
def x(*args, **kwargs):
    import torch
    return torch.nn.Linear(1, 1)
"""
HUBCONF = """
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "MARKER-hubconf"), "w").close()
dependencies = []
def evil(*args, **kwargs):
    import torch
    return torch.nn.Linear(1, 1)
"""
GOODPKG = """
import torch
from os import system
def net(width=4):
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU())
class Klass:
    @staticmethod
    def make():
        return torch.nn.Linear(1, 1)
def _hidden():
    return torch.nn.Linear(1, 1)
made = net(2)
"""
GOODPKG_INTERNAL = """
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "MARKER-goodpkg-internal"), "w").close()
def run():
    return None
"""


NOISYPKG = """
import os
exec("x = 1")
os.system("true")
def net():
    import torch
    return torch.nn.Linear(1, 1)
"""


class _Pwn:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    box = tmp_path_factory.mktemp("sandbox")
    (box / "evilmod.py").write_text(EVILMOD)
    (box / "hub").mkdir()
    (box / "hub" / "hubconf.py").write_text(HUBCONF)
    (box / "goodpkg").mkdir()
    (box / "goodpkg" / "__init__.py").write_text(GOODPKG)
    (box / "goodpkg" / "_internal.py").write_text(GOODPKG_INTERNAL)
    (box / "noisypkg.py").write_text(NOISYPKG)
    (box / "evil.pkl").write_bytes(pickle.dumps(_Pwn(f"touch {box / 'MARKER-pickle'}")))
    (box / "files").mkdir()
    return box


def run_harness(box: Path, cases: list[dict], timeout: int = 900) -> dict[str, dict]:
    """Load every case in the harness (a fresh interpreter, one forked child per case)."""
    (box / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same frostline
    done = subprocess.run(
        [sys.executable, str(HARNESS), "cases.json", "results.json"],
        cwd=box,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["id"]: r for r in json.loads((box / "results.json").read_text())}


def assert_inert(box: Path, results: dict[str, dict]) -> None:
    """No case recorded an event, and no marker file appeared."""
    noisy = {k: r["events"] for k, r in results.items() if r.get("events") and k != SELF_CHECK}
    assert not noisy, json.dumps({k: v[:3] for k, v in noisy.items()}, indent=1)[:6000]
    assert not list(box.glob(MARKERS)), sorted(p.name for p in box.glob(MARKERS))
    assert not list(box.glob("pwned*")), sorted(p.name for p in box.glob("pwned*"))


# -- the gadgets ---------------------------------------------------------------------------
def gadget_architectures(box: Path) -> dict[str, tuple[object, str]]:
    """id -> (architecture, a word the refusal must name). Each asks to run, import,
    unpickle, write or fetch something."""
    hub = str(box / "hub")
    pkl = str(box / "evil.pkl")
    touch = f"touch {box / 'pwned'}"

    def imp(target, *args, **kwargs):
        return {"kind": "import", "target": target, "args": list(args), "kwargs": kwargs}

    def layer(cls, **kwargs):
        return {"kind": "layer", "class": cls, "kwargs": kwargs}

    def seq(*recipes):
        return {
            "kind": "sequential",
            "class": "frostline.api.layer.SequentialModule",
            "layers": [{"name": f"l{i}", "layer": r} for i, r in enumerate(recipes)],
        }

    linear = layer("torch.nn.modules.linear.Linear", in_features=1, out_features=1, bias=True)
    out: dict[str, tuple[object, str]] = {
        # the gadgets
        "build_os_system": (
            imp("frostline.api.loading:build", "os:system", touch),
            "frostline.api.loading:build",
        ),
        "saving_build": (
            imp("frostline.saving:build", "os:system", touch),
            "frostline.saving:build",
        ),
        "import_path_evilmod": (
            imp("frostline.api.loading:import_path", "evilmod:x"),
            "import_path",
        ),
        "allowlist_import_path": (
            imp("frostline.api.allowlist:import_path", "evilmod:x"),
            "import_path",
        ),
        "hub_import": (imp("torch.hub:load", hub, "evil", source="local"), "torch.hub:load"),
        "hub_layer": (
            layer("torch.hub.load", repo_or_dir=hub, model="evil", source="local"),
            "torch.hub.load",
        ),
        "hub_nested": (
            seq(linear, seq(imp("torch.hub:load", hub, "evil", source="local"))),
            "torch.hub:load",
        ),
        "torch_load": (imp("torch:load", pkl, weights_only=False), "torch:load"),
        "serialization_load": (
            imp("torch.serialization:load", pkl, weights_only=False),
            "torch.serialization:load",
        ),
        "torch_save": (imp("torch:save", [1, 2], str(box / "pwned-save.pt")), "torch:save"),
        "torch_os_chain": (imp("torch:os.system", touch), "torch:os.system"),
        "timm_overlay": (
            imp(
                "timm:create_model",
                "resnet10t",
                pretrained=True,
                pretrained_cfg_overlay={"file": pkl},
            ),
            "pretrained",
        ),
        "timm_overlay_only": (
            imp("timm:create_model", "resnet10t", pretrained_cfg_overlay={"file": pkl}),
            "pretrained_cfg_overlay",
        ),
        "timm_checkpoint": (
            imp("timm:create_model", "resnet10t", checkpoint_path=pkl),
            "checkpoint_path",
        ),
        "timm_pretrained": (imp("timm:create_model", "resnet10t", pretrained=True), "pretrained"),
        "timm_cache_dir": (
            imp("timm:create_model", "resnet10t", cache_dir=str(box / "pwned-cache")),
            "cache_dir",
        ),
        "timm_hf_hub": (imp("timm:create_model", "hf-hub:evil/resnet10t"), "hf-hub:evil/resnet10t"),
        "timm_local_dir": (imp("timm:create_model", f"local-dir:{box}"), "local-dir"),
        "timm_private_kw": (
            imp("timm:create_model", "resnet10t", _model_args={"x": 1}),
            "_model_args",
        ),
        "timm_fx_features": (
            imp("timm:create_model", "resnet10t", features_only=True, feature_cls="fx"),
            "feature_cls",
        ),
        "zoo_pretrained": (
            {"kind": "zoo", "name": "resnet10t", "kwargs": {"pretrained": True}},
            "pretrained",
        ),
        "zoo_overlay": (
            {
                "kind": "zoo",
                "name": "efficientnet_lite0",
                "kwargs": {"pretrained_cfg_overlay": {"file": pkl}},
            },
            "pretrained_cfg_overlay",
        ),
        "zoo_hf_hub": ({"kind": "zoo", "name": "hf-hub:evil/x", "kwargs": {}}, "hf-hub:evil/x"),
        "tv_weights": (
            imp(
                "torchvision.models:get_model", "resnet18", weights="ResNet18_Weights.IMAGENET1K_V1"
            ),
            "weights",
        ),
        "tv_weights_default": (imp("torchvision.models:resnet18", weights="DEFAULT"), "weights"),
        "tv_weights_backbone": (
            imp(
                "torchvision.models:get_model",
                "fasterrcnn_mobilenet_v3_large_320_fpn",
                weights=None,
                weights_backbone="DEFAULT",
            ),
            "weights_backbone",
        ),
        "tv_progress": (imp("torchvision.models:get_model", "resnet18", progress=True), "progress"),
        "tv_unknown_name": (imp("torchvision.models:get_model", "../../evil"), "../../evil"),
        "builtins_eval": (
            imp("builtins:eval", "__import__('os').system('touch pwned')"),
            "builtins:eval",
        ),
        "os_system": (imp("os:system", touch), "os:system"),
        "subprocess_run": (imp("subprocess:run", ["touch", str(box / "pwned")]), "subprocess:run"),
        "private_torch": (imp("torch.nn.modules.module:_addindent", "x", 1), "_addindent"),
        "evilmod_untrusted": (imp("evilmod:x"), "evilmod"),
        "layer_hook": (
            layer("torch.nn.modules.module.Module.register_forward_hook"),
            "register_forward_hook",
        ),
        "layer_popen": (
            layer("subprocess.Popen", args=["touch", str(box / "pwned")]),
            "subprocess.Popen",
        ),
        "layer_os_system": (layer("os.system", command=touch), "os.system"),
        "layer_eval": (layer("builtins.eval", source="1"), "builtins.eval"),
        "layer_module_base": (layer("torch.nn.modules.module.Module"), "Module"),
        "layer_modulelist": (layer("torch.nn.modules.container.ModuleList"), "ModuleList"),
        "layer_evilmod": (layer("evilmod.x"), "evilmod.x"),
        "layer_private_kw": (
            layer(
                "torch.nn.modules.sparse.Embedding",
                num_embeddings=2,
                embedding_dim=2,
                _weight=[[1, 2], [3, 4]],
            ),
            "_weight",
        ),
        "layer_dict_kw": (
            layer(
                "torch.nn.modules.linear.Linear",
                in_features={"__class__": "os.system"},
                out_features=1,
            ),
            "in_features",
        ),
        "torch_nn_module": (imp("torch.nn:Module"), "torch.nn:Module"),
        "torch_nn_functional": (imp("torch.nn:functional"), "torch.nn:functional"),
        # from the hunt through frostline, torch, torchvision and timm
        "fl_load_other": (imp("frostline:load", str(box / "other.safetensors")), "frostline:load"),
        "fl_atomic_write": (
            imp("frostline.io.atomic:atomic_write_bytes", str(box / "pwned-atomic"), "x"),
            "atomic_write_bytes",
        ),
        "fl_cli_main": (
            imp("frostline.app.cli:main", ["demo", "--out", str(box / "pwned-demo")]),
            "frostline.app.cli:main",
        ),
        "fl_pretrained": (
            imp("frostline.models:pretrained", "resnet18"),
            "frostline.models:pretrained",
        ),
        "fl_extras": (imp("frostline.app.extras:need", "evilmod"), "frostline.app.extras:need"),
        "jit_load": (imp("torch.jit:load", pkl), "torch.jit:load"),
        "package_importer": (
            imp("torch.package:PackageImporter", pkl),
            "torch.package:PackageImporter",
        ),
        "cpp_extension": (
            imp("torch.utils.cpp_extension:load_inline", "x", "int x;"),
            "cpp_extension",
        ),
        "ops_load_library": (
            imp("torch.ops:load_library", str(box / "evil.so")),
            "torch.ops:load_library",
        ),
        "from_file_dev": (imp("torch:from_file", "/dev/zero", True, 10), "torch:from_file"),
        "hub_download": (
            imp("torch.hub:download_url_to_file", "http://127.0.0.1:9/x", str(box / "pwned-dl")),
            "download_url_to_file",
        ),
        "model_zoo_url": (
            imp("torch.utils.model_zoo:load_url", "http://127.0.0.1:9/x.pth"),
            "load_url",
        ),
        "fx_graph_module": (imp("torch.fx:symbolic_trace", "x"), "torch.fx:symbolic_trace"),
        "onnx_export": (
            imp("torch.onnx:export", "x", "y", str(box / "pwned.onnx")),
            "torch.onnx:export",
        ),
        "tv_write_file": (
            imp("torchvision.io:write_file", str(box / "pwned-tv"), "x"),
            "torchvision.io:write_file",
        ),
        "tv_read_file": (imp("torchvision.io:read_file", "/dev/zero"), "torchvision.io:read_file"),
        "tv_dataset_download": (
            imp("torchvision.datasets:MNIST", str(box / "pwned-mnist"), download=True),
            "torchvision.datasets:MNIST",
        ),
        "tv_save_image": (
            imp("torchvision.utils:save_image", [0.0], str(box / "pwned.png")),
            "save_image",
        ),
        "timm_load_checkpoint": (
            imp("timm.models:load_checkpoint", "x", pkl),
            "timm.models:load_checkpoint",
        ),
        "timm_push_to_hub": (imp("timm.models:push_to_hf_hub", "x", "evil/repo"), "push_to_hf_hub"),
        "tensorboard": (
            imp("torch.utils.tensorboard:SummaryWriter", str(box / "pwned-tb")),
            "SummaryWriter",
        ),
        "multiprocessing_spawn": (
            imp("torch.multiprocessing:spawn", "os:system"),
            "torch.multiprocessing:spawn",
        ),
        # malformed recipes
        "kind_unknown": ({"kind": "pickle", "data": "cos\nsystem\n"}, "pickle"),
        "deep_sequential": (
            {
                "kind": "sequential",
                "layers": [{"name": "a", "layer": {"kind": "sequential", "layers": []}}],
            },
            "",
        ),
    }
    deep: dict = linear
    for _ in range(200):
        deep = seq(deep)
    out["deep_sequential"] = (deep, "deeper")
    return out


def trusted_gadgets(box: Path) -> dict[str, tuple[object, str]]:
    """Gadgets in a package the user trusts: only an exact, public, own callable is called."""

    def imp(target, *args, **kwargs):
        return {"kind": "import", "target": target, "args": list(args), "kwargs": kwargs}

    return {
        "trusted_private_module": (imp("goodpkg._internal:run"), "_internal"),
        "trusted_private_name": (imp("goodpkg:_hidden"), "_hidden"),
        "trusted_attr_chain": (imp("goodpkg:Klass.make"), "Klass.make"),
        "trusted_reexport": (imp("goodpkg:system", f"touch {box / 'pwned'}"), "goodpkg:system"),
        "trusted_not_callable": (imp("goodpkg:made"), "goodpkg:made"),
        "trusted_other_package": (imp("evilmod:x"), "evilmod"),
    }


def header_gadgets(box: Path) -> dict[str, Path]:
    """Files whose safetensors framing or metadata JSON is hostile."""
    files = box / "files"
    out = {}

    def raw(name: str, data: bytes) -> None:
        out[name] = files / f"{name}.safetensors"
        out[name].write_bytes(data)

    raw("header_huge", (2**63 + 5).to_bytes(8, "little") + b"{}" + b" " * 6)
    raw("header_negative", (2**64 - 1).to_bytes(8, "little") + b"{}" + b" " * 6)
    raw("header_past_end", (4096).to_bytes(8, "little") + b"{" + b" " * 7)
    raw("header_not_json", (16).to_bytes(8, "little") + b"{not json at all")
    raw("header_not_object", (8).to_bytes(8, "little") + b"[1,2,3] ")
    for name, text in {
        "meta_deep": "[" * 200_000 + "]" * 200_000,
        "meta_digits": '{"format": "frostline.model", "version": ' + "9" * 100_000 + "}",
        "meta_not_object": '"frostline.model"',
        "meta_nan_kwargs": json.dumps(
            {
                "format": "frostline.model",
                "version": 1,
                "architecture": {
                    "kind": "layer",
                    "class": "torch.nn.modules.linear.Linear",
                    "kwargs": {"in_features": float("nan"), "out_features": 1},
                },
            }
        ),
    }.items():
        out[name] = write_raw(
            files / f"{name}.safetensors", {"frostline_model": text}, {"w": torch.zeros(1)}, True
        )
    fifo = files / "fifo.safetensors"
    os.mkfifo(fifo)
    out["fifo"] = fifo
    (files / "dir.safetensors").mkdir()
    out["directory"] = files / "dir.safetensors"
    (files / "zero.safetensors").symlink_to("/dev/zero")
    out["dev_zero_link"] = files / "zero.safetensors"
    out["dev_null"] = Path("/dev/null")
    return out


def _gadget_cases(box: Path) -> tuple[list[dict], dict[str, str]]:
    files, words = box / "files", {}
    cases = []
    for trusted, table in (([], gadget_architectures(box)), (["goodpkg"], trusted_gadgets(box))):
        for cid, (arch, word) in table.items():
            path = craft(files / f"{cid}.safetensors", arch)
            cases.append({"id": cid, "path": str(path), "trusted": trusted})
            words[cid] = word
    for cid, path in header_gadgets(box).items():
        cases.append({"id": cid, "path": str(path), "trusted": []})
        words[cid] = ""
    return cases, words


def _cli_cases(box: Path) -> list[dict]:
    """A run directory whose model file is a gadget, put through predict and evaluate."""
    from frostline.app.runinfo import Preprocessing

    run = box / "run-gadget"
    run.mkdir()
    Preprocessing.for_arrays(["a", "b"], [4], model="efficientnet_lite0").write(run)
    hub = str(box / "hub")
    craft(
        run / "model.safetensors",
        {
            "kind": "import",
            "target": "torch.hub:load",
            "args": [hub, "evil"],
            "kwargs": {"source": "local"},
        },
    )
    np.savez(box / "inputs.npz", x=np.zeros((2, 4), np.float32), y=np.array([0, 1]))
    return [
        {
            "id": "cli_predict",
            "path": None,
            "trusted": [],
            "cli": ["predict", str(run), str(box / "inputs.npz")],
        },
        {
            "id": "cli_evaluate",
            "path": None,
            "trusted": [],
            "cli": ["evaluate", str(run), str(box / "inputs.npz")],
        },
        {
            "id": "cli_trust_torch",
            "path": None,
            "trusted": [],
            "cli": ["predict", str(run), str(box / "inputs.npz"), "--trust", "torch"],
        },
    ]


# -- genuine files (the control) ---------------------------------------------------------
def genuine_models() -> dict[str, tuple[fl.Model, list[str]]]:
    import timm
    import torchvision

    torch.manual_seed(0)
    return {
        "sequential": (
            fl.Sequential(
                [
                    fl.layers.RandomFlip("horizontal"),
                    fl.layers.RandomRotation(0.1),
                    nn.Conv2d(3, 4, 3),
                    nn.BatchNorm2d(4),
                    nn.ReLU(),
                    nn.Flatten(),
                    nn.Linear(4 * 6 * 6, 3),
                ]
            ),
            [],
        ),
        "zoo": (fl.models.pretrained("efficientnet_lite0", pretrained=False, num_classes=3), []),
        "timm": (fl.wrap(timm.create_model("resnet10t", num_classes=4, drop_rate=0.25)), []),
        "torchvision": (fl.wrap(torchvision.models.resnet18(num_classes=5)), []),
        "build_layer": (fl.saving.build("torch.nn:Linear", 4, 2), []),
        "build_torchvision": (fl.saving.build("torchvision.models:resnet18", num_classes=3), []),
    }


@pytest.fixture(scope="module")
def genuine(sandbox) -> dict[str, tuple[Path, list[str]]]:
    """Genuine saved files, rewritten by hand with the digest dropped."""
    out = {}
    saved = sandbox / "saved"
    saved.mkdir()
    for cid, (model, trusted) in genuine_models().items():
        model.save(saved / f"{cid}.safetensors")
        out[cid] = (
            redigest(
                saved / f"{cid}.safetensors",
                sandbox / "files" / f"genuine_{cid}.safetensors",
                digest=False,
            ),
            trusted,
        )
    sys.path.insert(0, str(sandbox))
    try:
        fl.saving.build("goodpkg:net", width=5).save(saved / "trusted.safetensors")
    finally:
        sys.path.remove(str(sandbox))
        sys.modules.pop("goodpkg", None)
    out["trusted_package"] = (
        redigest(
            saved / "trusted.safetensors",
            sandbox / "files" / "genuine_trusted.safetensors",
            digest=False,
        ),
        ["goodpkg"],
    )
    return out


def test_crafted_digest_is_accepted_so_it_is_no_defence(tmp_path):
    """The digest is recomputable: a crafted file passes it, so safety cannot rest on it."""
    from frostline.io.safetensors_io import load_safetensors

    model = fl.Sequential([nn.Linear(2, 2)])
    model.save(tmp_path / "m.safetensors")
    copy = redigest(tmp_path / "m.safetensors", tmp_path / "c.safetensors", digest=True)
    assert load_safetensors(copy)[1] == load_safetensors(tmp_path / "m.safetensors")[1]
    assert fl.load(copy).count_params() == 6


@pytest.mark.slow
def test_every_gadget_is_refused_typed_and_inert(sandbox, genuine):
    cases, words = _gadget_cases(sandbox)
    cases += _cli_cases(sandbox)
    controls = [
        {"id": f"genuine_{k}", "path": str(p), "trusted": t} for k, (p, t) in genuine.items()
    ]
    # the harness can fail: a package the user trusts that runs code on import is seen
    noisy = craft(
        sandbox / "files" / "noisy.safetensors",
        {"kind": "import", "target": "noisypkg:net"},
        tensors={"weight": torch.zeros(1, 1), "bias": torch.zeros(1)},
    )
    check = {"id": SELF_CHECK, "path": str(noisy), "trusted": ["noisypkg"]}
    results = run_harness(sandbox, [check, *cases, *controls])
    assert results[SELF_CHECK]["outcome"] == "ok", results[SELF_CHECK]
    seen = {e[0] for e in results[SELF_CHECK]["events"]}
    assert {"exec", "compile", "os.system"} <= seen, results[SELF_CHECK]
    assert_inert(sandbox, results)
    for case in cases:
        r = results[case["id"]]
        if case.get("cli"):
            assert r["exit"] == 2, r
            lines = r["stderr"].strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("frostline: error:"), r["stderr"]
            continue
        assert r["outcome"] == "error", r
        assert r["error_type"] in TYPED and r["error_module"] == "frostline.io.errors", r
        assert "\n" not in r["message"], r["message"]
        assert words[case["id"]] in r["message"], (words[case["id"]], r["message"])
    refusals = [c["id"] for c in cases if results[c["id"]].get("error_type") == "UnsafeFileError"]
    assert len(refusals) >= 60, refusals
    for control in controls:
        r = results[control["id"]]
        assert r["outcome"] == "ok", r


def test_unsafe_refusals_say_what_and_how_to_trust(tmp_path):
    """The message names what the file asked for and how to trust a package of your own."""
    path = craft(tmp_path / "m.safetensors", {"kind": "import", "target": "mypkg_x.nets:build"})
    with pytest.raises(fl.UnsafeFileError) as e:
        fl.load(path)
    msg = str(e.value)
    assert (
        "'mypkg_x.nets:build'" in msg
        and "trusted_modules=['mypkg_x']" in msg
        and "--trust mypkg_x" in msg
    )
    assert "\n" not in msg
    path = craft(
        tmp_path / "t.safetensors",
        {"kind": "import", "target": "torch.hub:load", "args": ["x", "y"]},
    )
    with pytest.raises(fl.UnsafeFileError, match="never trusts all of 'torch'"):
        fl.load(path)


@pytest.mark.parametrize(
    "name", ["torch", "timm", "torchvision", "frostline", "os", "builtins", "a.b", "", "_x"]
)
def test_trusting_frostline_torch_or_python_itself_is_refused(tmp_path, name):
    fl.Sequential([nn.Linear(2, 2)]).save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="trusted_modules"):
        fl.load(tmp_path / "m.safetensors", trusted_modules=[name])


@pytest.mark.parametrize(
    "fields",
    [
        {"trainable": ["weight"]},
        {"trainable": {"frozen": "weight"}},
        {"trainable": {"flags": {"": "yes"}}},
        {"trainable": {"learning_rates": {"weight": "fast"}}},
        {"trainable": {"batchnorm_modes": {"": "os:system"}}},
        {"trainable": {"lora": {"": {"rank": 10**9, "alpha": 1}}}},  # 4 TB of adapters
        {"trainable": {"lora": {"": {"rank": "x"}}}},
        {"trainable": {"lora": ["weight"]}},
        {"name": ["m"]},
        {"rebuild_call": {"x": 1}, "architecture": None},
    ],
)
def test_other_metadata_of_the_wrong_shape_is_a_typed_error(tmp_path, fields):
    linear = {
        "kind": "layer",
        "class": "torch.nn.modules.linear.Linear",
        "kwargs": {"in_features": 1, "out_features": 1},
    }
    arch = fields.pop("architecture", linear)
    path = craft(
        tmp_path / "m.safetensors",
        arch,
        tensors={"weight": torch.zeros(1, 1), "bias": torch.zeros(1)},
        **fields,
    )
    with pytest.raises(fl.CheckpointError) as e:
        fl.load(path)
    assert "\n" not in str(e.value)


def test_a_fifo_fails_fast_instead_of_hanging(tmp_path):
    os.mkfifo(tmp_path / "m.safetensors")
    with pytest.raises(fl.CheckpointError, match="FIFO"):
        fl.load(tmp_path / "m.safetensors")
    with pytest.raises(fl.CheckpointError, match="character device"):
        fl.load("/dev/null")


def test_a_recipe_that_does_not_fit_the_file_takes_no_memory(tmp_path):
    """A 400 GB Linear is built on the meta device first and refused against the file's tensors."""
    arch = {
        "kind": "layer",
        "class": "torch.nn.modules.linear.Linear",
        "kwargs": {"in_features": 10**6, "out_features": 10**5},
    }
    path = craft(
        tmp_path / "m.safetensors",
        arch,
        tensors={"weight": torch.zeros(1, 1), "bias": torch.zeros(1)},
    )
    with pytest.raises(
        fl.CheckpointError,
        match="Shape mismatches: weight: file \\(1, 1\\) vs model \\(100000, 1000000\\)",
    ):
        fl.load(path)


def test_a_recipe_that_makes_endless_modules_is_stopped(tmp_path):
    arch = {
        "kind": "import",
        "target": "timm:create_model",
        "args": ["vit_tiny_patch16_224"],
        "kwargs": {"depth": 10**7},
    }
    path = craft(tmp_path / "m.safetensors", arch)
    with pytest.raises(
        fl.CheckpointError, match="'depth' is 10000000; registry model arguments are at most 131072"
    ):
        fl.load(path)  # a depth timm would spend minutes on before making a module
    arch["kwargs"]["depth"] = 50_000
    path = craft(tmp_path / "m.safetensors", arch)
    with pytest.raises(fl.CheckpointError, match="made more than 10020 modules"):
        fl.load(path)


@pytest.mark.parametrize(
    "target", ["timm.models:resnet10t", "timm:resnet10t", "timm.models.resnet:resnet10t"]
)
def test_a_timm_entrypoint_by_path_rebuilds_as_its_registry_name(tmp_path, target):
    """What `frostline fit --model timm.models:resnet10t` records loads without trust."""
    model = fl.saving.build(target, num_classes=3)
    model.save(tmp_path / "t.safetensors")
    assert fl.load(tmp_path / "t.safetensors").count_params() == model.count_params()
    with pytest.raises(ValueError, match="pretrained"):
        fl.saving.build(target, pretrained=True)


def test_build_refuses_what_load_would_refuse():
    with pytest.raises(ValueError, match="fl.load would refuse"):
        fl.saving.build("torch:load", "x.pt")
    with pytest.raises(ValueError, match="pretrained"):
        fl.saving.build("timm:create_model", "resnet10t", pretrained=True)
    m = fl.saving.build("timm:create_model", "resnet10t", num_classes=3)
    assert m.module.num_classes == 3


def test_torchvision_detection_never_downloads_a_backbone(tmp_path, monkeypatch):
    """torchvision's detection builders download backbone weights unless told not to; a
    file that leaves weights_backbone out is built with None."""
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("a backbone download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    made = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3)
    arch = {
        "kind": "import",
        "target": "torchvision.models:get_model",
        "args": [name],
        "kwargs": {"num_classes": 3},
    }
    path = craft(tmp_path / "d.safetensors", arch, tensors=made.state_dict())
    assert fl.load(path).count_params() == fl.wrap(made).count_params()


# -- mutations of genuine architectures (hypothesis) ----------------------------------------
GADGET_STRINGS = [
    "os:system",
    "torch.hub:load",
    "torch:load",
    "builtins:eval",
    "evilmod:x",
    "evilmod.x",
    "subprocess.Popen",
    "torch.nn.modules.module.Module.register_forward_hook",
    "frostline.api.loading:build",
    "frostline.api.allowlist:import_path",
    "timm:create_model",
    "torchvision.models:get_model",
    "torch.nn:Linear",
    "hf-hub:evil/x",
    "local-dir:.",
    "/dev/zero",
    "../../etc/passwd",
    "touch pwned",
    "layer",
    "import",
    "zoo",
    "sequential",
    "",
    "__class__",
]
GADGET_KEYS = [
    "pretrained",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "weights",
    "weights_backbone",
    "target",
    "class",
    "args",
    "kwargs",
    "layers",
    "_weight",
    "__class__",
    "source",
    "feature_cls",
]
VALUES = st.one_of(
    st.sampled_from(GADGET_STRINGS),
    st.sampled_from([True, False, None, 0, -1, 1, 3, 10**12, 1.5, float("inf")]),
    st.just({"file": "evil.pkl"}),
    st.just(["os:system", "touch pwned"]),
    st.just([]),
    st.just({}),
)


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(tree, path, value):
    if not path:
        return value
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return tree


@st.composite
def mutated(draw, architectures):
    """A genuine architecture with 1-3 edits: a string swapped for a gadget target, a key
    injected, a key deleted, a value of another type."""
    import copy

    base = draw(st.sampled_from(sorted(architectures)))
    arch = copy.deepcopy(architectures[base])
    for _ in range(draw(st.integers(1, 3))):
        nodes = list(_paths(arch))[1:] or [((), arch)]
        op = draw(
            st.sampled_from(
                ["gadget", "gadget", "gadget", "inject", "inject", "delete", "retype", "kind"]
            )
        )
        if op == "kind":
            kinds = [(p, v) for p, v in nodes if p and p[-1] == "kind"] or nodes
            path, _ = draw(st.sampled_from(kinds))
            arch = _set(arch, path, draw(st.sampled_from(["layer", "import", "zoo", "sequential"])))
        elif op == "gadget":
            strings = [(p, v) for p, v in nodes if isinstance(v, str) and p[-1] != "kind"] or nodes
            path, _ = draw(st.sampled_from(strings))
            arch = _set(arch, path, draw(st.sampled_from(GADGET_STRINGS)))
        elif op == "inject":
            dicts = [v for _, v in _paths(arch) if isinstance(v, dict)]
            if dicts:
                node = draw(st.sampled_from(dicts))
                node[draw(st.sampled_from(GADGET_KEYS))] = copy.deepcopy(draw(VALUES))
        elif op == "delete":
            dicts = [v for _, v in _paths(arch) if isinstance(v, dict) and v]
            if dicts:
                node = draw(st.sampled_from(dicts))
                node.pop(draw(st.sampled_from(sorted(node, key=str))))
        else:
            path, node = draw(st.sampled_from(nodes))
            swaps = {str: 7, int: "7", float: [1.0], bool: "true", list: {"0": node}, dict: [node]}
            arch = _set(arch, path, copy.deepcopy(swaps.get(type(node), "x")))
    return base, arch


@pytest.mark.slow
def test_mutated_architectures_load_or_fail_typed_and_never_act(sandbox, genuine):
    from safetensors import safe_open

    architectures, sources = {}, {}
    for cid, (path, trusted) in genuine.items():
        with safe_open(str(path), "pt") as f:
            architectures[cid] = json.loads(f.metadata()["frostline_model"])["architecture"]
        sources[cid] = (path, trusted)
    out = sandbox / "mutants"
    out.mkdir()
    cases: list[dict] = []

    @settings(
        max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(mutated(architectures))
    def collect(pair):
        base, arch = pair
        i = len(cases)
        path = redigest(
            sources[base][0],
            out / f"m{i:04d}.safetensors",
            digest=True,
            meta_edit=lambda meta: {**meta, "architecture": arch},
        )
        cases.append(
            {"id": f"m{i:04d}", "path": str(path), "trusted": sources[base][1], "arch": arch}
        )

    collect()
    results = run_harness(sandbox, cases)
    assert_inert(sandbox, results)
    for case in cases:
        r = results[case["id"]]
        assert r["outcome"] in ("ok", "error"), (case["arch"], r)
        if r["outcome"] == "error":
            assert r["error_type"] in TYPED and r["error_module"] == "frostline.io.errors", (
                json.dumps(case["arch"])[:2000],
                r,
            )
            assert "\n" not in r["message"]
