"""Tests for frostline.io.safetensors_io: round trips, the content digest, damaged files."""

from __future__ import annotations

import base64
import json
import os
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frostline.io.errors import CheckpointError
from frostline.io.safetensors_io import (
    load_safetensors,
    safetensors_bytes,
    save_safetensors,
    tensors_from_checked_bytes,
)


def _listing(path):
    return sorted(os.listdir(path))


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


# ------------------------------------------------------ files from earlier versions

# Written by frostline's earlier hand-written writer (its own header JSON, metadata
# first, space padding) for _OLD_TENSORS and _OLD_META; the digest format is unchanged.
_OLD_FILE = base64.b64decode(
    "uAEAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJub3RlIjoid3JpdHRlbiBieSBmcm9zdGxpbmUgMC54IiwiZnJvc3Rs"
    "aW5lLmRpZ2VzdCI6ImZyb3N0bGluZS1zaGEyNTYtdjE6ZTU3ZGU5Nzc5Y2U3ZTkxZDY2MDQ2MWFhOTBlZjk4Njg2"
    "NGNjYzAxMmUwMGQ2NDRmNjU2MTI4NDRiNDZiZjhkMSIsImZyb3N0bGluZS5kaWdlc3QuY2hlY2siOiJmcm9zdGxp"
    "bmUtc2hhMjU2LXYxOmU1N2RlOTc3OWNlN2U5MWQ2NjA0NjFhYTkwZWY5ODY4NjRjY2MwMTJlMDBkNjQ0ZjY1NjEy"
    "ODQ0YjQ2YmY4ZDEifSwiYiI6eyJkdHlwZSI6Ikk2NCIsInNoYXBlIjpbMl0sImRhdGFfb2Zmc2V0cyI6WzAsMTZd"
    "fSwidyI6eyJkdHlwZSI6IkYzMiIsInNoYXBlIjpbMiwzXSwiZGF0YV9vZmZzZXRzIjpbMTYsNDBdfSwiaCI6eyJk"
    "dHlwZSI6IkJGMTYiLCJzaGFwZSI6WzFdLCJkYXRhX29mZnNldHMiOls0MCw0Ml19fSAgIAEAAAAAAAAA/v//////"
    "//8AAAAAAACAPwAAAEAAAEBAAACAQAAAoEAAPw=="
)
_OLD_TENSORS = {
    "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1, -2], dtype=torch.int64),
    "h": torch.tensor([0.5], dtype=torch.bfloat16),
}
_OLD_META = {"note": "written by frostline 0.x"}


def test_files_written_by_the_earlier_writer_load_and_verify(tmp_path):
    p = tmp_path / "old.safetensors"
    p.write_bytes(_OLD_FILE)
    tensors, md = load_safetensors(p)
    assert md == _OLD_META
    assert tensors.keys() == _OLD_TENSORS.keys()
    for k, t in _OLD_TENSORS.items():
        assert tensors[k].dtype == t.dtype and torch.equal(tensors[k], t), k
    # the digest is still checked on such files: one flipped data bit is caught
    damaged = bytearray(_OLD_FILE)
    damaged[-3] ^= 0x01
    p.write_bytes(damaged)
    with pytest.raises(CheckpointError, match="does not match its digest"):
        load_safetensors(p)


def test_digest_format_is_unchanged():
    """Same content, same digest as the earlier writer: old and new files interoperate."""
    n = int.from_bytes(_OLD_FILE[:8], "little")
    old_digest = json.loads(_OLD_FILE[8 : 8 + n])["__metadata__"]["frostline.digest"]
    blob = safetensors_bytes(_OLD_TENSORS, _OLD_META)
    m = int.from_bytes(blob[:8], "little")
    new_md = json.loads(blob[8 : 8 + m])["__metadata__"]
    assert new_md["frostline.digest"] == new_md["frostline.digest.check"] == old_digest


def test_metadata_cannot_impersonate_the_digest(tmp_path):
    """A foreign file that carries a digest-looking entry is checked, not trusted."""
    fake = "frostline-sha256-v1:" + "0" * 64
    p = tmp_path / "f.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2)}, p, {"frostline.digest": fake})
    with pytest.raises(CheckpointError, match="digest entries are damaged"):
        load_safetensors(p)
    safetensors.torch.save_file(
        {"a": torch.ones(2)}, p, {"frostline.digest": fake, "frostline.digest.check": fake}
    )
    with pytest.raises(CheckpointError, match="does not match its digest"):
        load_safetensors(p)


def test_checked_bytes_roundtrip_and_errors():
    blob = safetensors_bytes(_OLD_TENSORS, {"k": "v"})
    out = tensors_from_checked_bytes(blob, "x/model.safetensors")
    assert all(torch.equal(out[k], t) for k, t in _OLD_TENSORS.items())
    for bad in [b"", blob[:20], blob[:-1], blob + b"\0"]:
        with pytest.raises(CheckpointError, match="x/model.safetensors: corrupted"):
            tensors_from_checked_bytes(bad, "x/model.safetensors")
