"""Tests for frostline.engine.activations (ActivationStore) and frostline.engine.fingerprints."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from frostline.engine.activations import ActivationStore
from frostline.engine.fingerprints import (
    CacheKey,
    StepCounter,
    data_fingerprint,
    weights_checksum,
    weights_version,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def _prefix() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
    ).eval()


def _batches(x: torch.Tensor, batch_size: int, order: torch.Tensor | None = None):
    order = torch.arange(len(x)) if order is None else order
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield idx, x[idx]


def _build(fn, x, batch_size=7, order=None, **kwargs) -> ActivationStore:
    return ActivationStore.build(fn, _batches(x, batch_size, order), len(x), **kwargs)


# ------------------------------------------------------------------ ActivationStore


def test_memory_and_disk_give_identical_gathers(tmp_path: Path) -> None:
    model = _prefix()
    x = torch.randn(23, 3, 5, 5)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    mem = _build(model, x, order=order)
    disk = _build(model, x, order=order, memory_budget_bytes=1, spill_dir=tmp_path)
    assert (mem.location, disk.location) == ("memory", "disk")
    assert mem.path is None and disk.path is not None and disk.path.parent == tmp_path
    for store in (mem, disk):
        assert len(store) == 23
        assert store.sample_shape == torch.Size([4, 5, 5])
        assert store.dtype == store.storage_dtype == torch.float32
        assert store.nbytes == 23 * 4 * 5 * 5 * 4
    idx = torch.tensor([22, 0, 5, 5, 17])
    assert torch.equal(mem[idx], disk[idx])
    assert torch.equal(mem[idx], expected[idx])
    assert torch.equal(disk[torch.arange(23)], expected)
    assert mem[idx].is_contiguous() and disk[idx].is_contiguous()
    mem.close()
    disk.close()


def test_gather_forms_and_copies() -> None:
    x = torch.randn(10, 3)
    store = _build(lambda t: t + 1, x)
    assert torch.equal(store[3], x[3] + 1)
    assert torch.equal(store[torch.tensor(4)], x[4] + 1)
    assert torch.equal(store[[1, 2]], x[[1, 2]] + 1)
    assert torch.equal(store[np.array([9, 0])], x[[9, 0]] + 1)
    assert torch.equal(store[2:8:3], x[2:8:3] + 1)
    assert store[torch.tensor([], dtype=torch.long)].shape == (0, 3)
    out = store[torch.tensor([0])]
    out.zero_()  # a gather is a copy, not a view into the store
    assert torch.equal(store[0], x[0] + 1)
    for bad in (10, -1, torch.tensor([0, 10])):
        with pytest.raises(IndexError):
            store[bad]
    with pytest.raises(TypeError):
        store[torch.tensor([0.0])]
    store.close()
    assert store.closed
    with pytest.raises(RuntimeError, match="closed"):
        store[0]
    store.close()  # idempotent


@pytest.mark.parametrize("budget", [2**40, 1])
def test_float16_storage_round_trips(budget: int) -> None:
    x = torch.randn(40, 6) * 100
    store = _build(lambda t: t * 1.5, x, memory_budget_bytes=budget, dtype=torch.float16)
    assert store.storage_dtype == torch.float16
    assert store.nbytes == 40 * 6 * 2
    out = store[torch.arange(40)]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x * 1.5, rtol=2**-10, atol=0.0)
    assert torch.equal(out, (x * 1.5).half().float())
    store.close()


def test_float16_overflow_is_an_error() -> None:
    x = torch.tensor([[1.0], [1e6]])
    with pytest.raises(ValueError, match="overflow"):
        _build(lambda t: t, x, dtype=torch.float16)
    store = _build(lambda t: t, x, dtype=torch.bfloat16)  # bfloat16 has the range
    assert store[1].item() == pytest.approx(1e6, rel=1e-2)
    store.close()


def test_disk_file_removed_on_close_and_gc(tmp_path: Path) -> None:
    x = torch.randn(8, 4)
    store = _build(torch.sin, x, memory_budget_bytes=0, spill_dir=tmp_path)
    path = store.path
    assert path is not None and path.exists() and path.stat().st_size == store.nbytes
    store.close()
    assert not path.exists()
    assert tmp_path.exists()  # a directory we were given stays

    store = _build(torch.sin, x, memory_budget_bytes=0, spill_dir=tmp_path)
    path = store.path
    del store
    gc.collect()
    assert path is not None and not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_default_spill_dir_removed() -> None:
    store = _build(torch.cos, torch.randn(5, 2), memory_budget_bytes=0)
    assert store.path is not None
    directory = store.path.parent
    assert directory.name.startswith("frostline-cache-")
    store.close()
    assert not directory.exists()


def test_spill_file_not_left_behind_at_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import torch
        from frostline.engine.activations import ActivationStore
        x = torch.randn(6, 3)
        a = ActivationStore.build(torch.exp, [(torch.arange(6), x)], 6, memory_budget_bytes=0)
        b = ActivationStore.build(
            torch.exp, [(torch.arange(6), x)], 6, memory_budget_bytes=0, spill_dir={str(tmp_path)!r}
        )
        print(a.path)
        print(b.path)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    paths = [Path(line) for line in proc.stdout.split()]
    assert len(paths) == 2
    assert not paths[0].exists() and not paths[0].parent.exists()
    assert not paths[1].exists()


@pytest.mark.parametrize("budget", [2**40, 0])
def test_map_equals_recomputing(budget: int) -> None:
    first = _prefix()
    second = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 3), torch.nn.Flatten()).eval()
    x = torch.randn(19, 3, 6, 6)
    order = torch.randperm(19, generator=torch.Generator().manual_seed(2))
    store = _build(first, x, order=order, memory_budget_bytes=budget)
    grown = store.map(second, batch_size=4)
    with torch.no_grad():
        expected = second(first(x))
    fresh = _build(torch.nn.Sequential(first, second), x, memory_budget_bytes=budget)
    assert grown.location == store.location == ("memory" if budget else "disk")
    assert grown.sample_shape == torch.Size([2 * 4 * 4])
    torch.testing.assert_close(grown[torch.arange(19)], expected)
    torch.testing.assert_close(grown[torch.arange(19)], fresh[torch.arange(19)])
    assert not store.closed  # map leaves the source open
    for s in (store, grown, fresh):
        s.close()


def test_map_options() -> None:
    x = torch.randn(9, 3)
    store = _build(lambda t: t, x, dtype=torch.float16)
    inherited = store.map(lambda t: t * 2, batch_size=2)
    assert inherited.storage_dtype == torch.float16
    spilled = store.map(lambda t: t * 2, batch_size=5, memory_budget_bytes=0, dtype=None)
    assert spilled.location == "disk" and spilled.storage_dtype == torch.float32
    torch.testing.assert_close(spilled[torch.arange(9)], x.half().float() * 2)
    with pytest.raises(ValueError):
        store.map(lambda t: t, batch_size=0)
    for s in (store, inherited, spilled):
        s.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
    on_disk=st.booleans(),
    dtype=st.sampled_from([None, torch.float16]),
)
def test_build_gathers_match_fn(
    n: int, batch_size: int, seed: int, on_disk: bool, dtype: torch.dtype | None
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, generator=gen)
    order = torch.randperm(n, generator=gen)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(t.flatten(1) * 3)

    store = _build(
        fn, x, batch_size, order, memory_budget_bytes=0 if on_disk else 2**30, dtype=dtype
    )
    assert store.location == ("disk" if on_disk else "memory")
    query = torch.randint(0, n, (min(n, 17),), generator=gen)
    expected = fn(x[query])
    if dtype is not None:
        expected = expected.to(dtype).float()
    assert torch.equal(store[query], expected)
    path = store.path
    store.close()
    assert path is None or not path.exists()


@pytest.mark.parametrize("budget", [2**30, 0])
def test_missing_duplicate_and_bad_indices(budget: int, tmp_path: Path) -> None:
    x = torch.randn(6, 2)
    opts = {"memory_budget_bytes": budget, "spill_dir": tmp_path}
    with pytest.raises(ValueError, match="2 of 6 sample indices were never filled"):
        ActivationStore.build(torch.neg, [(torch.tensor([0, 1, 2, 3]), x[:4])], 6, **opts)
    dup_across = [(torch.tensor([0, 1, 2]), x[:3]), (torch.tensor([2, 3, 4, 5]), x[2:])]
    with pytest.raises(ValueError, match="index 2 was filled more than once"):
        ActivationStore.build(torch.neg, dup_across, 6, **opts)
    dup_within = [(torch.tensor([0, 1, 1, 2, 3, 4, 5]), x[[0, 1, 1, 2, 3, 4, 5]])]
    with pytest.raises(ValueError, match="more than once"):
        ActivationStore.build(torch.neg, dup_within, 6, **opts)
    with pytest.raises(ValueError, match="out of range"):
        ActivationStore.build(torch.neg, [(torch.arange(1, 7), x)], 6, **opts)
    with pytest.raises(ValueError, match="first dimension"):
        ActivationStore.build(lambda t: t[:2], [(torch.arange(6), x)], 6, **opts)
    with pytest.raises(ValueError, match="empty"):
        ActivationStore.build(torch.neg, [], 6, **opts)
    assert list(tmp_path.iterdir()) == []  # failed builds leave no spill file


def test_output_shape_change_is_an_error() -> None:
    x = torch.randn(4, 3)
    calls = iter([lambda t: t, lambda t: t[:, :2]])
    with pytest.raises(ValueError, match="changed"):
        ActivationStore.build(lambda t: next(calls)(t), _batches(x, 2), 4)


# --------------------------------------------------------------------- fingerprints


@settings(max_examples=80, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.int16]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
        elements=st.integers(0, 200),
    ),
    data=st.data(),
)
def test_fingerprint_changes_with_any_element(arr: np.ndarray, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, arr.size - 1))
    changed = arr.copy()
    flat = changed.reshape(-1)
    flat[pos] = flat[pos] + 1 if flat[pos] < 100 else flat[pos] - 1
    assert data_fingerprint(changed) != data_fingerprint(arr)
    assert data_fingerprint(arr.copy()) == data_fingerprint(arr)
    assert data_fingerprint(torch.from_numpy(arr.copy())) == data_fingerprint(arr)


def test_fingerprint_equal_data_different_objects() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 20)).astype(np.float32)
    labels = rng.integers(0, 10, 30)
    ref = data_fingerprint(a, labels)
    assert data_fingerprint(a.copy(), labels.copy()) == ref
    assert data_fingerprint(np.asfortranarray(a), labels) == ref  # layout does not matter
    assert data_fingerprint(torch.tensor(a), torch.tensor(labels)) == ref
    t = torch.tensor(a.T.copy()).T  # non-contiguous tensor, same values
    assert data_fingerprint(t, labels) == ref
    assert data_fingerprint(torch.tensor(a, requires_grad=True), labels) == ref
    assert len(ref) == 64 and int(ref, 16) >= 0


def test_fingerprint_sensitive_to_dtype_shape_and_grouping() -> None:
    a = np.arange(12, dtype=np.float32)
    b = np.arange(3, dtype=np.int64)
    ref = data_fingerprint(a, b)
    assert data_fingerprint(a.reshape(3, 4), b) != ref
    assert data_fingerprint(a.view(np.int32), b) != ref
    assert data_fingerprint(b, a) != ref
    assert data_fingerprint(a) != ref
    assert data_fingerprint(a[:6], a[6:]) != data_fingerprint(a)
    assert data_fingerprint() != data_fingerprint(np.zeros(0, np.float32))
    assert data_fingerprint(np.float32(1.0)) == data_fingerprint(np.array(1.0, np.float32))


def test_fingerprint_large_parallel_exact() -> None:
    a = np.random.default_rng(1).standard_normal(5_000_000).astype(np.float32)  # 20 MB
    ref = data_fingerprint(a, workers=1)
    assert data_fingerprint(a, workers=4) == ref
    for pos in (0, 262_143, 262_144, 4_999_999):  # leaf boundaries (1 MiB = 262144 floats)
        b = a.copy()
        b[pos] = np.nextafter(b[pos], np.float32(np.inf))
        assert data_fingerprint(b) != ref


def test_fingerprint_torch_only_dtypes_and_errors() -> None:
    t = torch.randn(5).to(torch.bfloat16)
    assert data_fingerprint(t) == data_fingerprint(t.clone())
    assert data_fingerprint(t) != data_fingerprint(t.view(torch.float16))
    with pytest.raises(TypeError):
        data_fingerprint([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        data_fingerprint(np.array([object()]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fingerprint_cuda_matches_cpu() -> None:
    t = torch.randn(1000, 7)
    assert data_fingerprint(t.cuda()) == data_fingerprint(t)


# ------------------------------------------------------------------ weights_version


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)
    )


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False),
        lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),  # does not bump _version
    ],
    ids=["sgd", "adam-loop", "adam-foreach", "adamw-fused"],
)
def test_weights_version_changes_after_optimizer_step(make_opt) -> None:
    model = _model()
    opt = make_opt(model.parameters())
    steps = StepCounter()  # counts this optimizer's steps only; no process-wide hook
    steps.watch(opt)
    model(torch.randn(5, 4)).sum().backward()
    before = weights_version(model.parameters(), steps=steps)
    opt.step()
    assert weights_version(model.parameters(), steps=steps) != before
    steps.detach()


def test_frozen_parameters_in_optimizer_keep_their_version() -> None:
    model = _model()
    frozen = list(model[0].parameters())
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    before = weights_version(frozen, checksum=True)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    assert weights_version(frozen, checksum=True) == before


def test_weights_version_in_place_modifications() -> None:
    model = _model()
    w = model[0].weight

    before = weights_version(_tensors(model))
    with torch.no_grad():
        w.add_(1)
    assert weights_version(_tensors(model)) != before

    before = weights_version(_tensors(model))
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert weights_version(_tensors(model)) != before

    before = weights_version(_tensors(model))
    w.data = torch.randn_like(w)
    assert weights_version(_tensors(model)) != before

    before = weights_version(_tensors(model))
    torch.nn.init.zeros_(model[3].bias)
    assert weights_version(_tensors(model)) != before

    before = weights_version(_tensors(model))
    model[0].weight = torch.nn.Parameter(w.detach().clone())  # same values, new object
    assert weights_version(_tensors(model)) != before


def test_data_writes_need_the_checksum() -> None:
    """``p.data`` / numpy writes bypass ``_version``: only ``checksum=True`` sees them."""
    model = _model()
    w = model[0].weight
    for modify in (
        lambda: w.data.copy_(torch.randn_like(w)),
        lambda: w.data.mul_(2),
        lambda: w.detach().numpy().__setitem__((0, 0), 123.0),
    ):
        cheap = weights_version(_tensors(model))
        full = weights_version(_tensors(model), checksum=True)
        modify()
        assert weights_version(_tensors(model)) == cheap  # documented limitation
        assert weights_version(_tensors(model), checksum=True) != full


def test_weights_version_unchanged_by_eval_forward() -> None:
    model = _model().eval()
    before = weights_version(_tensors(model), checksum=True)
    with torch.no_grad():
        model(torch.randn(5, 4))
    model(torch.randn(5, 4)).sum()  # with autograd too
    assert weights_version(_tensors(model), checksum=True) == before
    model.train()(torch.randn(5, 4))  # train-mode BN updates its running stats
    assert weights_version(_tensors(model)) != before


def test_weights_version_inference_tensors_and_types() -> None:
    with torch.inference_mode():
        t = torch.ones(3)
    before = weights_version([t])
    with torch.inference_mode():
        t.add_(1)
    assert weights_version([t]) != before
    with pytest.raises(TypeError):
        weights_version([np.ones(3)])  # type: ignore[list-item]


def test_weights_checksum_sees_bit_level_changes() -> None:
    base = torch.tensor([1.0, 2.0, 0.0, float("nan"), 5.0])
    ref = weights_checksum([base])

    def check(modify) -> None:
        t = base.clone()
        modify(t)
        assert weights_checksum([t]) != ref

    check(lambda t: t.__setitem__(0, 2.0))
    check(lambda t: t.__setitem__(1, 1.0) or t.__setitem__(0, 2.0))  # swap
    check(lambda t: t.__setitem__(2, -0.0))
    check(lambda t: t.view(torch.int32)[3].add_(1))  # another NaN payload
    check(lambda t: t.__setitem__(4, float(np.nextafter(np.float32(5.0), np.float32(9)))))
    assert weights_checksum([base.clone()]) == ref
    big = torch.randn(3_000_003)
    big_ref = weights_checksum([big])
    big[2_999_999], big[5] = big[5].item(), big[2_999_999].item()
    assert weights_checksum([big]) != big_ref
    mixed = [torch.ones(2, dtype=torch.bool), torch.ones(3, dtype=torch.bfloat16), torch.ones(2, 2)]
    assert len(weights_checksum(mixed)) == 3


# ------------------------------------------------------------------------- CacheKey


def test_cache_key_equality() -> None:
    x = np.arange(10.0)
    model = _model().eval()

    def key(
        boundary: tuple[str, ...] = ("layer2",), mode: str = "bn=eval;dtype=float32"
    ) -> CacheKey:
        return CacheKey(boundary, data_fingerprint(x), weights_version(_tensors(model)), mode)

    k = key()
    assert k == key() and hash(k) == hash(key())
    assert k != key(boundary=("layer3",))
    assert k != key(boundary=("layer2", "input:mask"))
    assert k != key(mode="bn=train;dtype=float32")
    x[3] = -1
    assert k != key()
    with pytest.raises(AttributeError):
        k.boundary = ("layer4",)  # type: ignore[misc]
    assert {k: 1}[CacheKey(k.boundary, k.data, k.weights, k.mode)] == 1
