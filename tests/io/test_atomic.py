"""Tests for frostline.io.atomic: atomic writes, directory swaps, stale-temp cleanup."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from frostline.io import atomic
from frostline.io.atomic import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cleanup_stale_temps,
    remove_path,
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


def test_remove_path_removes_files_links_and_trees(tmp_path):
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("x")
    (tmp_path / "file").write_text("y")
    (tmp_path / "link").symlink_to(tmp_path / "tree")
    remove_path(tmp_path / "link")  # the link only, never what it points to
    assert (tmp_path / "tree" / "sub" / "f").exists()
    for name in ["tree", "file", "missing"]:
        remove_path(tmp_path / name)
    assert _listing(tmp_path) == []
