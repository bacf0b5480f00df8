"""Tests for frostline.io.atomic: atomic writes, directory swaps, safetensors I/O."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frostline.io import atomic
from frostline.io.atomic import (
    CheckpointError,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cleanup_stale_temps,
    load_safetensors,
    save_safetensors,
)


def _listing(path):
    return sorted(os.listdir(path))


def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device (simulated)")


# ----------------------------------------------------------------- atomic writers


def test_atomic_write_bytes_text_json_roundtrip(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5, None], "nan": float("nan")})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    loaded = json.loads((tmp_path / "c.json").read_text())
    assert loaded["x"] == [1, 2.5, None] and loaded["nan"] != loaded["nan"]
    assert _listing(tmp_path) == ["a.bin", "b.txt", "c.json"]


def test_atomic_write_replaces_and_keeps_mode(tmp_path):
    p = tmp_path / "f"
    atomic_write_bytes(p, b"old")
    os.chmod(p, 0o640)
    atomic_write_bytes(p, bytearray(b"new"))
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert _listing(tmp_path) == ["f"]


@pytest.mark.parametrize("target", ["fsync", "replace", "chmod"])
def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, target):
    p = tmp_path / "state.json"
    atomic_write_json(p, {"epoch": 1})
    before = p.read_bytes()
    monkeypatch.setattr(os, target, _boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_json(p, {"epoch": 2})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert _listing(tmp_path) == ["state.json"]


def test_failure_during_write_call_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "w.bin"
    atomic_write_bytes(p, b"A" * 100)
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(p, b"B" * 1000)
    monkeypatch.undo()
    assert p.read_bytes() == b"A" * 100
    assert _listing(tmp_path) == ["w.bin"]


def test_interrupt_mid_write_cleans_up(tmp_path, monkeypatch):
    p = tmp_path / "x.bin"
    atomic_write_bytes(p, b"keep me")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(p, b"partial")
    monkeypatch.undo()
    assert p.read_bytes() == b"keep me"
    assert _listing(tmp_path) == ["x.bin"]


def test_failure_on_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _boom)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "new.bin", b"data")
    monkeypatch.undo()
    assert _listing(tmp_path) == []


def test_unserializable_json_touches_nothing(tmp_path):
    p = tmp_path / "s.json"
    atomic_write_json(p, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": True}
    assert _listing(tmp_path) == ["s.json"]
    with pytest.raises(TypeError, match="bytes-like"):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]


# -------------------------------------------------------------- atomic_directory


def test_atomic_directory_creates(tmp_path):
    final = tmp_path / "run" / "epoch-00001"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".epoch-00001.tmp-")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
        assert not final.exists()
    assert (final / "sub" / "a.txt").read_text() == "a"
    assert _listing(final.parent) == ["epoch-00001"]


def test_atomic_directory_failure_removes_temp_and_keeps_old(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(final) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("boom")
    assert (final / "v").read_text() == "1"
    assert _listing(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_atomic_directory_replaces_existing(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "old.txt").write_text("old")
        (tmp / "shared.txt").write_text("old")
    with atomic_directory(final) as tmp:
        (tmp / "shared.txt").write_text("new")
    assert _listing(final) == ["shared.txt"]
    assert (final / "shared.txt").read_text() == "new"
    assert _listing(tmp_path) == ["ckpt"]


def test_rename_aside_rolls_back_when_second_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("old")
    real_rename = os.rename

    def flaky_rename(src, dst):
        if ".tmp-" in os.fspath(src) and os.fspath(dst) == os.fspath(final):
            raise OSError(5, "I/O error (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"), atomic_directory(final) as tmp:
        (tmp / "v").write_text("new")
    monkeypatch.undo()
    assert (final / "v").read_text() == "old"
    assert _listing(tmp_path) == ["ckpt"]


def test_renameat2_exchange_is_used_on_linux(tmp_path):
    if atomic._load_renameat2() is None:
        pytest.skip("renameat2 not available")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic._exchange(a, b):
        pytest.skip("filesystem does not support RENAME_EXCHANGE")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_cleanup_stale_temps(tmp_path):
    (tmp_path / "keep.json").write_text("{}")
    (tmp_path / ".keep.json.tmp-abc").write_text("partial")
    (tmp_path / ".epoch-00001.tmp-x1").mkdir()
    (tmp_path / "epoch-00002").mkdir()
    (tmp_path / ".epoch-00002.old-zz").mkdir()  # superseded: delete
    (tmp_path / ".epoch-00003.old-yy").mkdir()  # interrupted replace: restore
    (tmp_path / ".epoch-00003.old-yy" / "data").write_text("saved")
    (tmp_path / ".other.tmp-q").write_text("not ours")
    removed = cleanup_stale_temps(tmp_path, match=lambda n: n != "other")
    assert len(removed) == 4
    assert _listing(tmp_path) == [".other.tmp-q", "epoch-00002", "epoch-00003", "keep.json"]
    assert (tmp_path / "epoch-00003" / "data").read_text() == "saved"
    assert cleanup_stale_temps(tmp_path / "missing") == []


# -------------------------------------------------------------------- safetensors


def _sample_tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "f32": base,
        "f32_t": base.t(),  # non-contiguous view of the same storage
        "f32_alias": base,  # the very same tensor under another name
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "i64": torch.arange(7),
        "i8": torch.tensor([-3, 0, 4], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2)),
    }


def test_save_load_roundtrip(tmp_path):
    tensors = _sample_tensors()
    p = save_safetensors(tensors, tmp_path / "t.safetensors", {"k": "v", "n": "1"})
    assert p == tmp_path / "t.safetensors"
    loaded, md = load_safetensors(p)
    assert md == {"k": "v", "n": "1"}
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape, k
        assert torch.equal(loaded[k], t.detach()), k
        assert loaded[k].is_contiguous() and loaded[k].device.type == "cpu"
    # standard safetensors readers can read the file too
    assert torch.equal(safetensors.torch.load_file(p)["f32_t"], tensors["f32_t"])
    assert _listing(tmp_path) == ["t.safetensors"]


def test_save_empty_and_foreign_files(tmp_path):
    save_safetensors({}, tmp_path / "e.safetensors")
    assert load_safetensors(tmp_path / "e.safetensors") == ({}, {})
    # a file written by the plain safetensors library (no digest) still loads
    safetensors.torch.save_file({"a": torch.ones(3)}, tmp_path / "f.safetensors", {"m": "x"})
    t, md = load_safetensors(tmp_path / "f.safetensors")
    assert torch.equal(t["a"], torch.ones(3)) and md == {"m": "x"}


def test_save_rejects_bad_input(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="'a' is a list"):
        save_safetensors({"a": [1, 2]}, p)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="dict\\[str, str\\]"):
        save_safetensors({"a": torch.ones(1)}, p, {"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="reserved"):
        save_safetensors({"a": torch.ones(1)}, p, {"frostline.digest": "x"})
    with pytest.raises(TypeError, match="layout"):
        save_safetensors({"a": torch.eye(2).to_sparse()}, p)
    assert _listing(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_save_cuda_tensors(tmp_path):
    t = torch.randn(3, 4, device="cuda")
    save_safetensors({"t": t, "v": t[:, 1]}, tmp_path / "c.safetensors")
    loaded, _ = load_safetensors(tmp_path / "c.safetensors")
    assert torch.equal(loaded["t"], t.cpu()) and torch.equal(loaded["v"], t[:, 1].cpu())


def _expect_error(path, fragment):
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert fragment in msg, msg
    assert isinstance(info.value, ValueError)
    return msg


def test_load_errors_name_path_and_problem(tmp_path):
    good = tmp_path / "good.safetensors"
    save_safetensors({"w": torch.arange(100, dtype=torch.float32)}, good)
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")

    _expect_error(tmp_path / "missing.safetensors", "missing")
    _expect_error(tmp_path, "directory")
    for name, content, fragment in [
        ("empty", b"", "truncated: file is empty"),
        ("tiny", data[:5], "truncated"),
        ("cut_header", data[: 8 + n // 2], f"truncated: header says {n} bytes"),
        ("cut_data", data[:-10], "truncated: header describes 400 bytes of tensor data"),
        ("trailing", data + b"xx", "unexpected bytes"),
        ("pickle", pickle.dumps({"w": [1, 2, 3]}), "not a safetensors file"),
        ("text", b"hello world, this is not a tensor file", "not a safetensors file"),
        ("bad_json", data[:8] + b"{" + b"!" * (n - 1) + data[8 + n :], "corrupted header"),
    ]:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        _expect_error(p, fragment)

    flipped = bytearray(data)
    flipped[-1] ^= 0x40  # one bit in the tensor data
    (tmp_path / "flip.safetensors").write_bytes(flipped)
    _expect_error(tmp_path / "flip.safetensors", "does not match its digest")


def test_load_never_uses_pickle(tmp_path, monkeypatch):
    save_safetensors({"w": torch.ones(3)}, tmp_path / "w.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle/torch.load must not be used")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, forbidden)
    tensors, _ = load_safetensors(tmp_path / "w.safetensors")
    assert torch.equal(tensors["w"], torch.ones(3))


# ------------------------------------------------------------- hypothesis fuzzing

_FUZZ_TENSORS = {
    "weight": torch.arange(24, dtype=torch.float32).reshape(4, 6),
    "bias": torch.tensor([1.5, -2.0], dtype=torch.float64),
    "idx": torch.tensor([3, 1, 2], dtype=torch.int32),
    "w1": torch.ones(2, dtype=torch.float16),
    "w2": torch.zeros(2, dtype=torch.float16),
}
_FUZZ_META = {"model": "tiny", "epoch": "3"}


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    good = save_safetensors(_FUZZ_TENSORS, d / "good.safetensors", _FUZZ_META)
    return d, good.read_bytes()


def _load_or_error(path):
    """Load ``path``; success must reproduce the original data exactly."""
    try:
        tensors, md = load_safetensors(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return False
    assert md == _FUZZ_META
    assert tensors.keys() == _FUZZ_TENSORS.keys()
    for k, t in _FUZZ_TENSORS.items():
        assert tensors[k].dtype == t.dtype and tensors[k].shape == t.shape
        assert torch.equal(tensors[k], t)
    return True


_fuzz_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_fuzz_settings
@given(data=st.data())
def test_random_truncation_always_checkpoint_error(fuzz_file, data):
    d, blob = fuzz_file
    cut = data.draw(st.integers(min_value=0, max_value=len(blob) - 1), label="cut")
    p = d / "cut.safetensors"
    p.write_bytes(blob[:cut])
    assert _load_or_error(p) is False


@_fuzz_settings
@given(data=st.data())
def test_random_header_byte_flips_error_or_identical(fuzz_file, data):
    d, blob = fuzz_file
    header_end = 8 + int.from_bytes(blob[:8], "little")
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, header_end - 1), st.integers(1, 255)),
            min_size=1,
            max_size=3,
        ),
        label="flips",
    )
    mutated = bytearray(blob)
    for pos, xor in flips:
        mutated[pos] ^= xor
    p = d / "flip.safetensors"
    p.write_bytes(mutated)
    _load_or_error(p)  # raises only via a failed assertion or a non-CheckpointError


@_fuzz_settings
@given(data=st.data())
def test_random_flips_anywhere_error_or_identical(fuzz_file, data):
    d, blob = fuzz_file
    pos = data.draw(st.integers(0, len(blob) - 1), label="pos")
    xor = data.draw(st.integers(1, 255), label="xor")
    mutated = bytearray(blob)
    mutated[pos] ^= xor
    p = d / "any.safetensors"
    p.write_bytes(mutated)
    _load_or_error(p)


def test_new_files_and_dirs_follow_the_umask_without_reading_it(tmp_path, monkeypatch):
    """The kernel applies the umask; frostline never calls os.umask (a process-wide setting)."""
    import frostline.io.atomic as atomic_mod

    def no_umask(*_a):
        raise AssertionError("os.umask must not be called: it changes the whole process")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        atomic_mod.atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_mod.atomic_directory(tmp_path / "run") as d:
            (d / "f").write_text("y")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o750


def test_import_calls_no_umask():
    """`import frostline` never calls os.umask (reading it means setting it, process-wide)."""
    code = (
        "import os\n"
        "def boom(*a):\n"
        "    raise SystemExit('os.umask called at import')\n"
        "os.umask = boom\n"
        "import frostline\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (
        out.stderr[-2000:] + out.stdout[-500:]
    )
