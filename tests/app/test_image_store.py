"""Image folders at scale: decoded once into a disk-backed uint8 store, streamed per batch.

The store is a file (an ``ImageFile``, read with ``pread``, never mapped) in a temporary
folder beside the run directory; the datasets ``frostline fit`` trains on select their
rows by index (no copy), read a batch of rows at a time, fingerprint in bounded chunks
and travel to worker processes as the store's file name.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frostline.app import cli, imagefolder, outputs, training
from frostline.app.imagefolder import (
    ImageArrayDataset,
    ImageFile,
    load_image_folder,
    scratch_dir,
    stratified_split,
)

FACTORY = """
from torch import nn

def build(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes),
    )
"""


def write_folder(root: Path, per_class: int, size: int, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., c] = 200  # a class colour to learn from
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def load_and_read_one_epoch(root: Path, size: int, store_dir: Path | None) -> tuple[int, type]:
    """Peak traced bytes of loading the folder, fingerprinting a split and reading every sample."""
    gc.collect()
    tracemalloc.start()
    try:
        data = load_image_folder(root, size, store_dir=store_dir)
        train, val = stratified_split(data.y, 0.2, seed=0)
        for rows in (train, val):
            ds = ImageArrayDataset(data.x, data.y, indices=rows)
            ds.fingerprint()
            for i in range(len(ds)):
                ds[i]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, type(data.x)


def test_a_folder_is_decoded_into_a_disk_store_and_read_in_bounded_memory(tmp_path):
    size, per_class = 64, 100
    root = write_folder(tmp_path / "data", per_class, size)
    total = 3 * per_class * size * size * 3  # 3.7 MB of decoded pixels
    store = tmp_path / "store"
    store.mkdir()
    warm = write_folder(tmp_path / "warm", 2, 4)  # the modules reading imports, not measured
    load_and_read_one_epoch(warm, 4, store)
    peak, kind = load_and_read_one_epoch(root, size, store)
    assert kind is ImageFile
    assert (store / imagefolder.STORE_FILE).stat().st_size == total
    assert peak < total / 4, f"peak {peak} bytes traced for {total} bytes of images"
    # the in-memory path holds every image at once: the measure sees it
    peak_in_ram, kind = load_and_read_one_epoch(root, size, None)
    assert kind is np.ndarray and peak_in_ram > total


def mapped(path: Path) -> bool:
    """Whether ``path`` is mapped into this process (its pages would count in its RSS)."""
    return any(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))


def test_a_large_store_streams_in_batches_without_holding_or_mapping_it(tmp_path, monkeypatch):
    """20,000 images (61 MB decoded; the decoder is synthetic, so no file is written but
    the store): writing the store, fingerprinting a split and reading every sample a
    batch at a time trace less than 2 MB, and the store's file is never mapped (a memory
    map's touched pages would count in the process's resident memory); the in-memory
    path traces all of it."""
    n, size = 20_000, 32
    total = n * size * size * 3
    files = [Path(f"class{i % 2}") / f"{i}.png" for i in range(n)]

    def synthetic(path, side):
        i = int(Path(path).stem)
        return np.full((side, side, 3), i % 251, np.uint8)

    monkeypatch.setattr(imagefolder, "decode_image", synthetic)

    def stream(store_dir):
        gc.collect()
        tracemalloc.start()
        try:
            x, kept, _ = imagefolder.read_images(files, size, store_dir=store_dir)
            labels = np.arange(n) % 2
            ds = ImageArrayDataset(x, labels, indices=np.arange(1, n, 2))
            ds.fingerprint()
            order = np.random.default_rng(0).permutation(len(ds))
            seen = 0
            for start in range(0, len(ds), 256):
                batch = ds.__getitems__(order[start : start + 256].tolist())
                seen += len(batch)
            last = ds.__getitems__([len(ds) - 1])[0][0]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert seen == n // 2 and len(kept) == n
        assert float(last[0, 0, 0]) == pytest.approx(((n - 1) % 251 / 255 - 0.5) / 0.5)
        return peak, x

    store = tmp_path / "store"
    store.mkdir()
    peak, x = stream(store)
    assert isinstance(x, ImageFile) and x.nbytes == total
    assert peak < 2_000_000, f"peak {peak} bytes traced for {total} bytes of images"
    assert not mapped(store / imagefolder.STORE_FILE)
    x.close()
    del x
    peak_in_ram, x = stream(None)
    assert isinstance(x, np.ndarray) and peak_in_ram > total


def test_an_image_file_reads_the_rows_asked_for(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (7, 3, 4, 3), dtype=np.uint8)
    (tmp_path / "s.u8").write_bytes(images.tobytes())
    f = ImageFile(tmp_path / "s.u8", images.shape)
    assert len(f) == 7 and f.shape == images.shape and f.nbytes == images.nbytes
    np.testing.assert_array_equal(f[2], images[2])
    np.testing.assert_array_equal(f[-1], images[-1])
    np.testing.assert_array_equal(f[1:6:2], images[1:6:2])
    for rows in ([4, 5, 6, 0, 1, 1], np.array([3, 2, 1]), [], [-2]):
        np.testing.assert_array_equal(f[rows], images[rows])
    np.testing.assert_array_equal(np.asarray(f), images)
    with pytest.raises(IndexError, match="out of range for 7 images"):
        f[[0, 7]]
    with pytest.raises(IndexError, match="an int, a slice or 1-d row numbers"):
        f[np.ones(7, bool)]
    with pytest.raises(imagefolder.InputError, match="holds 252 bytes; expected 216"):
        ImageFile(tmp_path / "s.u8", (6, 3, 4, 3))
    back = pickle.loads(pickle.dumps(f))
    np.testing.assert_array_equal(back[[6, 0]], images[[6, 0]])
    f.close()
    np.testing.assert_array_equal(f[0], images[0])  # opened again


def test_a_batch_read_equals_reading_each_sample(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)
    (tmp_path / "s.u8").write_bytes(images.tobytes())
    labels = np.arange(10) % 3
    for source in (images, ImageFile(tmp_path / "s.u8", images.shape)):
        ds = ImageArrayDataset(
            source, labels, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), indices=[9, 2, 4, 7]
        )
        got = ds.__getitems__([3, 0, 0, 2])
        for (x, y), i in zip(got, [3, 0, 0, 2]):
            want_x, want_y = ds[i]
            torch.testing.assert_close(x, want_x, rtol=0, atol=0)
            assert int(y) == int(want_y)
    # fit reads a Dataset through __getitems__ when it has one
    from frostline.engine.data import IndexedData

    calls = []
    real = ImageArrayDataset.__getitems__

    def spy(self, indices):
        calls.append(list(indices))
        return real(self, indices)

    ds = ImageArrayDataset(images, labels)
    ImageArrayDataset.__getitems__ = spy  # type: ignore[method-assign]
    try:
        x, y = IndexedData(ds, len(ds), True).gather(torch.tensor([5, 1]))
    finally:
        ImageArrayDataset.__getitems__ = real  # type: ignore[method-assign]
    assert calls == [[5, 1]] and tuple(x.shape) == (2, 3, 5, 5) and y.tolist() == [2, 1]


def test_the_store_holds_what_decoding_gives_and_skips_unreadable_files(tmp_path):
    root = write_folder(tmp_path / "data", 4, 8, classes=2)
    (root / "class1" / "broken.png").write_bytes(b"not an image")
    store = tmp_path / "store"
    store.mkdir()
    on_disk = load_image_folder(root, 8, store_dir=store)
    in_ram = load_image_folder(root, 8)
    assert isinstance(on_disk.x, ImageFile) and not hasattr(on_disk.x, "__setitem__")
    np.testing.assert_array_equal(np.asarray(on_disk.x), in_ram.x)
    assert on_disk.x.shape == (8, 8, 8, 3) and [s.path for s in on_disk.skipped] == [
        str(Path("class1") / "broken.png")
    ]
    assert (
        store / imagefolder.STORE_FILE
    ).stat().st_size == on_disk.x.nbytes  # cut to what was read


def test_a_split_reads_its_rows_without_copying_and_fingerprints_like_a_copy(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    images = np.memmap(tmp_path / "s.u8", np.uint8, mode="w+", shape=(20, 6, 6, 3))
    images[:] = rng.integers(0, 256, images.shape, dtype=np.uint8)
    labels = np.arange(20) % 4
    rows = np.array([3, 17, 5, 0, 9])
    split = ImageArrayDataset(images, labels, indices=rows)
    copied = ImageArrayDataset(np.array(images[rows]), labels[rows])
    assert split.images is images  # the store itself, not a copy
    assert len(split) == 5 and split.labels_at(torch.arange(5)).tolist() == labels[rows].tolist()
    for i in range(5):
        torch.testing.assert_close(split[i][0], copied[i][0], rtol=0, atol=0)
    expected = copied.fingerprint()
    monkeypatch.setattr(imagefolder, "FINGERPRINT_CHUNK_BYTES", 200)  # two rows at a time
    assert ImageArrayDataset(images, labels, indices=rows).fingerprint() == expected
    images[rows[4], 0, 0, 0] ^= 1  # one bit of one selected image
    assert ImageArrayDataset(images, labels, indices=rows).fingerprint() != expected
    images[1, 0, 0, 0] ^= 1  # a row the split does not select
    assert ImageArrayDataset(images, labels, indices=rows).fingerprint() != expected
    assert (
        ImageArrayDataset(images, labels, indices=rows).fingerprint()
        == ImageArrayDataset(np.array(images[rows]), labels[rows]).fingerprint()
    )
    x, y = split.arrays()
    assert tuple(x.shape) == (5, 3, 6, 6) and y.tolist() == labels[rows].tolist()


def test_a_store_backed_dataset_pickles_as_its_file_name(tmp_path):
    images = np.memmap(tmp_path / "s.u8", np.uint8, mode="w+", shape=(64, 32, 32, 3))
    images[:] = 7
    images.flush()
    ds = ImageArrayDataset(images, np.arange(64) % 2, indices=np.arange(0, 64, 2))
    blob = pickle.dumps(ds)
    assert len(blob) < images.nbytes / 20  # not the pixels
    back = pickle.loads(blob)
    assert isinstance(back.images, np.memmap) and len(back) == 32
    torch.testing.assert_close(back[3][0], ds[3][0], rtol=0, atol=0)
    in_ram = ImageArrayDataset(np.array(images), np.arange(64) % 2)
    assert len(pickle.dumps(in_ram)) > images.nbytes  # an in-memory array travels whole


def test_bad_indices_and_label_counts_say_what_was_expected():
    images = np.zeros((4, 2, 2, 3), np.uint8)
    with pytest.raises(imagefolder.InputError, match=r"indices range over \[0, 4\]; expected"):
        ImageArrayDataset(images, np.zeros(4), indices=np.array([0, 4]))
    with pytest.raises(imagefolder.InputError, match="4 images and 3 labels"):
        ImageArrayDataset(images, np.zeros(3))


# ----------------------------------------------------------------------------- the CLI


def fit(tmp_path, capsys, name, *extra):
    out = tmp_path / name
    argv = ["fit", "data", "--model", "tiny_factory:build", "--image-size", 8, "--epochs1", 3]
    code = cli.main([str(a) for a in [*argv, "--seed", 3, "--out", out, *extra]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture
def folder(tmp_path, monkeypatch):
    (tmp_path / "tiny_factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    write_folder(tmp_path / "data", 8, 8, classes=2)
    seen: list[tuple[type, int]] = []
    real = training.train_two_phase

    def spy(model, base, x, y, **kwargs):
        seen.append((type(x.images), kwargs.get("workers")))
        return real(model, base, x, y, **kwargs)

    monkeypatch.setattr(training, "train_two_phase", spy)
    return seen


def test_fit_trains_from_the_store_and_removes_it(tmp_path, capsys, folder):
    metrics = fit(tmp_path, capsys, "run")
    assert folder == [(ImageFile, 0)]
    assert metrics["phases"][0]["cache"].startswith("train: reused")
    assert not list(tmp_path.glob(".frostline-images-*"))  # the store went with the run


def test_fit_workers_give_the_losses_of_reading_in_process(tmp_path, capsys, folder, monkeypatch):
    readers = tmp_path / "readers.txt"
    real, real_many = ImageArrayDataset.__getitem__, ImageArrayDataset.__getitems__

    def note() -> None:
        with open(readers, "a") as f:
            f.write(f"{os.getpid()}\n")

    def read(self, i):
        note()
        return real(self, i)

    def read_many(self, indices):
        note()
        return real_many(self, indices)

    monkeypatch.setattr(ImageArrayDataset, "__getitem__", read)
    monkeypatch.setattr(ImageArrayDataset, "__getitems__", read_many)
    a = fit(tmp_path, capsys, "w0", "--workers", 0)
    b = fit(tmp_path, capsys, "w2", "--workers", 2)
    assert [w for _, w in folder] == [0, 2]
    assert b["config"]["workers"] == 2
    losses = [m["phases"][0]["history"]["loss"] for m in (a, b)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    # cached: the epoch that builds the cache reads in the training process, later ones read nothing
    assert set(readers.read_text().split()) == {str(os.getpid())}
    readers.unlink()
    c = fit(tmp_path, capsys, "aug", "--workers", 2, "--augment", "flip")
    assert all(np.isfinite(c["phases"][0]["history"]["loss"]))
    pids = readers.read_text().split()
    assert set(pids) - {str(os.getpid())}  # augmented batches: read by worker processes


def test_the_store_goes_when_training_fails(tmp_path, capsys, folder, monkeypatch):
    stores = []

    def fail(model, base, x, y, **kwargs):
        stores.append(Path(x.images.filename))
        assert stores[0].exists()
        raise KeyboardInterrupt  # what a SIGTERM or Ctrl-C becomes

    monkeypatch.setattr(training, "train_two_phase", fail)
    code = cli.main(["fit", "data", "--model", "tiny_factory:build", "--image-size", "8"])
    capsys.readouterr()
    assert code != 0
    assert stores[0].parent.parent == tmp_path  # beside the run directory
    assert stores[0].parent.name.startswith(".frostline-images-")
    assert not stores[0].parent.exists()


def test_a_killed_runs_image_store_is_swept_by_the_next_run(tmp_path):
    """A run killed outright (SIGKILL) cannot remove its store; the next run beside it does."""
    runs = tmp_path / "runs"
    runs.mkdir()
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from frostline.app.imagefolder import scratch_dir\n"
            f"with scratch_dir({str(runs / 'fit-1')!r}) as d:\n"
            "    print(d, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = Path(killed.stdout.strip())
    assert left.parent == runs and left.is_dir()  # what SIGKILL leaves behind
    with scratch_dir(runs / "fit-2") as mine:
        assert outputs.sweep(runs) == [left]  # the dead run's store goes ...
        assert mine.is_dir()  # ... this live run's stays
    assert not left.exists() and not mine.exists()
