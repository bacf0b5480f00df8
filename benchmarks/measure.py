"""What the benchmark scripts measure: wall, CPU time and peak memory of a phase, and the machine.

Shared by the benchmark scripts (each imports it from beside itself), so
all measure a phase, and write their JSON, the same way:

* wall clock (``time.perf_counter``) and CPU time of the process (all threads,
  user + system) around the phase;
* on CPU, the process's RSS high-water mark (``VmHWM``), reset through
  ``/proc/self/clear_refs`` before the phase where the kernel allows it (else no peak),
  and the RSS (``VmRSS``) at its start;
* on CUDA, ``torch.cuda.max_memory_allocated`` (reset before the phase) and the
  allocated memory at its start, with the device synchronised at both ends.

torch is imported only for CUDA phases, so a peer without torch (Keras) pays nothing
for it.

>>> with Phase(cuda=False) as p:
...     _ = sum(range(1000))
>>> p.seconds >= 0 and p.cpu_seconds >= 0
True
>>> sorted(machine_info())
['cores', 'cpu', 'os', 'python']
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "Phase",
    "cpu_seconds",
    "machine_info",
    "maxrss_mb",
    "proc_status_mb",
    "reset_peak",
    "write_json",
]


def proc_status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU time of this process (all threads, user + system)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def maxrss_mb() -> float:
    """Peak RSS of this process over its whole life (``ru_maxrss``) in MiB."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class Phase:
    """Wall time, CPU time and peak memory of one phase (RSS on CPU, allocator peak on CUDA).

    After the ``with`` block: ``seconds``, ``cpu_seconds``, ``peak_mb`` (None where the
    high-water mark could not be reset) and ``start_mb``.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.peak_mb: float | None = None
        self.start_mb: float | None = None

    def __enter__(self) -> Phase:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        self.hwm_reset = reset_peak()
        if not self.cuda:
            self.start_mb = proc_status_mb("VmRSS")
        self.t0 = time.perf_counter()
        self.c0 = cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = cpu_seconds() - self.c0
        if self.cuda:
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.hwm_reset:
            self.peak_mb = proc_status_mb("VmHWM")


def machine_info() -> dict[str, Any]:
    """The CPU model, usable cores, Python and OS of this machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return {
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def write_json(
    path: str | os.PathLike, args: argparse.Namespace, internal: tuple[str, ...] = (), **fields: Any
) -> None:
    """Write a benchmark's results to ``path`` as JSON: the command line's options (without
    the ones a worker subprocess is told, ``worker``, ``result`` and ``internal``), this
    machine (:func:`machine_info`), then ``fields`` in order.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "r.json"
    >>> write_json(out, argparse.Namespace(repeat=2, worker=None), results={"a": 1.5})
    >>> d = json.loads(out.read_text())
    >>> d["args"], sorted(d), d["results"]
    ({'repeat': 2}, ['args', 'machine', 'results'], {'a': 1.5})
    """
    hidden = ("worker", "result", *internal)
    payload = {
        "args": {k: v for k, v in vars(args).items() if k not in hidden},
        "machine": machine_info(),
        **fields,
    }
    Path(path).write_text(json.dumps(payload, indent=2))


def device_available(device: str) -> bool:
    """Whether a benchmark can run on ``device``; says why not on stderr.

    >>> device_available("cpu")
    True
    """
    if device != "cuda":
        return True
    import torch

    if torch.cuda.is_available():
        return True
    print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
    return False
