"""Shared test set-up: quiet threads, headless plots, no script imported as a doctest module."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Importing triton (via torch._dynamo, which torchvision pulls in) after TensorFlow
# segfaults this venv; importing it first, once, keeps every test order safe.
import torch._dynamo  # noqa: E402, F401

# Scripts run as subprocesses by the tests (crash loops, torchrun workers) must never be imported.
collect_ignore_glob = ["_*.py", "*/_*.py", "*/dist_scripts/*"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: intra-op threads only add contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
