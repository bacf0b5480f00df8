"""What fit allocates for its training data: never a temporary the size of the data.

Peak memory is compared with a hand-written loop (benchmarks/sweep.py), which makes no
such check; a full-size temporary there showed as the whole dataset once more in
frostline's peak RSS. The allocations are read from ``torch.profiler`` (every CPU
allocation, with its size), not from the process's RSS.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from frostline.engine.data import DataError, check_finite_values


def largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


def check(t: torch.Tensor, **kw) -> str | None:
    try:
        check_finite_values(t, "x", **kw)
    except DataError as e:
        return str(e)
    return None


def test_largest_allocation_sees_a_full_size_temporary():
    x = torch.randn(256, 3, 32, 32)
    assert largest_allocation(lambda: torch.isfinite(x).all()) >= x.numel()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_finite_check_allocates_no_temporary_the_size_of_the_data(layout, bad):
    x = torch.randn(1024, 3, 32, 32)  # 12 MiB
    if bad is not None:
        x[900, 1, 5, 7] = bad
    if layout == "transposed":  # a non-contiguous input is not copied either
        x = x.transpose(2, 3)
    biggest = largest_allocation(lambda: check(x))
    assert biggest <= x.nbytes // 8, f"{biggest} bytes allocated for a {x.nbytes}-byte input"


def test_finite_check_names_the_first_bad_sample_across_chunks():
    x = torch.randn(5000, 3, 4, 4)
    x[3001, 2, 1, 1] = float("inf")
    x[4000, 0, 0, 0] = float("nan")
    x[4000, 0, 0, 1] = float("nan")
    msg = "x contains NaN values (3 in all; first in sample 3001)"
    assert check(x, chunk=1000) == msg
    assert check(x, chunk=1) == msg  # one sample per chunk
    assert check(x, chunk=1 << 30) == msg  # one chunk
    only_inf = torch.zeros(10, 4)
    only_inf[7, 3] = -float("inf")
    assert check(only_inf) == "x contains inf values (1 in all; first in sample 7)"


def test_finite_values_whose_sum_overflows_pass():
    x = torch.full((64, 8), 3e38)  # each value finite, their sum is inf
    assert not torch.isfinite(x.sum())
    assert check(x, chunk=16) is None
    assert check(torch.randn(100, 5)) is None
    assert check(torch.randn(7)) is None  # one value per sample


@pytest.mark.parametrize("frozen", [False, True])
def test_fit_allocates_nothing_the_size_of_the_training_data(frozen):
    """fit reads the user's array in place: batches are gathered by index, the NaN check
    and the data's fingerprint make no full-size temporary, nothing copies the inputs whole
    (with a frozen first layer, the cache holds only its 8-wide output)."""
    import numpy as np

    import frostline as fl

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 64)).astype("float32")  # 5 MB
    y = rng.integers(0, 3, 20_000)
    torch.manual_seed(0)
    model = fl.Sequential([torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)])
    if frozen:
        model.layers[0].trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    biggest = largest_allocation(
        lambda: model.fit(x, y, batch_size=2_000, epochs=2, verbose=0, shuffle=True)
    )
    assert biggest <= x.nbytes // 8, f"{biggest} bytes allocated for {x.nbytes} bytes of data"
