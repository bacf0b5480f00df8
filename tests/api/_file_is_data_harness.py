"""Load model files under an audit hook and report everything each load did.

Run as a script from a sandbox directory (which holds ``evilmod.py``)::

    python _file_is_data_harness.py CASES.json RESULTS.json

``CASES.json`` is a list of ``{"id", "path", "trusted": [...], "cli": [argv] or null}``.
The interpreter imports what a genuine load needs (frostline, timm, torchvision, the
CLI) and puts the working directory on ``sys.path`` (as ``python -c`` and the CLI do),
then forks one child per case, so each case starts from the same state and none sees
another's imports. The child adds a ``sys.addaudithook`` hook and then calls ``fl.load``
(or the CLI's ``main``); the hook records every event that runs, imports, compiles,
unpickles, writes, deletes, spawns or opens a socket or a foreign library, and every file
opened other than the case's own. ``RESULTS.json`` gets, per case: ``outcome`` (``ok``,
``error`` or ``hang``), the error's type, module and message (or the CLI's exit code and
stderr) and the recorded ``events``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import sys
import time

# Events that run code, import it, unpickle, spawn, touch the network or load native code.
WATCHED = {
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.startfile",
    "os.kill",
    "subprocess.Popen",
    "exec",
    "compile",
    "import",
    "pickle.find_class",
    "marshal.loads",
    "marshal.load",
    "code.__new__",
    "function.__new__",
    "urllib.Request",
    "http.client.connect",
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.utime",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.move",
    "tempfile.mkstemp",
    "tempfile.mkdtemp",
}
WATCHED_PREFIXES = (
    "socket.",
    "ctypes.",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "_posixsubprocess",
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
TIMEOUT_S = 120


def _describe(args) -> str:
    text = repr(args)
    return text if len(text) < 300 else text[:297] + "..."


def _open_event(args, own: set[str], cli: bool) -> str | None:
    """Why an ``open`` event is suspicious (a write, or a file not the case's), or None."""
    path, mode, flags = (list(args) + [None, None, None])[:3]
    writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & WRITE_FLAGS
    )
    if writes:
        return "open for writing"
    if cli or isinstance(path, int):  # the CLI reads its run directory and inputs
        return None
    if os.fsdecode(path).endswith((".py", ".pyc")):  # module source: "import" events cover it
        return None
    if os.path.realpath(os.fsdecode(path)) in own:
        return None
    return "open of another file"


def _trusted_import(event: str, args, trusted: list[str]) -> bool:
    """An event of importing a package the user trusts: the import itself, or compiling and
    running that package's own source files."""
    if event == "import":
        return bool(args) and str(args[0]).split(".")[0] in trusted
    if event == "compile" and len(args) > 1:
        filename = args[1]
    elif event == "exec" and args and hasattr(args[0], "co_filename"):
        filename = args[0].co_filename
    else:
        return False
    parts = os.fsdecode(filename).replace(os.sep, "/").split("/")
    return any(p in trusted or p.removesuffix(".py") in trusted for p in parts[-3:-1] + parts[-1:])


def run_case(case: dict) -> dict:
    """In the forked child: load the case's file under the audit hook."""
    import frostline as fl

    own = {os.path.realpath(case["path"])} if case.get("path") else set()
    cli = bool(case.get("cli"))
    events: list[list[str]] = []
    armed = [False]

    def hook(event: str, args) -> None:
        if not armed[0]:
            return
        if event == "open":
            why = _open_event(args, own, cli)
            if why:
                events.append([event, why, _describe(args)])
        elif event in WATCHED or event.startswith(WATCHED_PREFIXES):
            if _trusted_import(event, args, case["trusted"]):
                return  # the user trusts this package: importing it is what they asked for
            events.append([event, "", _describe(args)])

    sys.addaudithook(hook)
    result: dict = {"id": case["id"]}
    stderr = io.StringIO()
    armed[0] = True
    try:
        if cli:
            from frostline.app.cli import main

            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                code = main(case["cli"])
            result.update(outcome="ok" if code == 0 else "error", exit=code)
        else:
            fl.load(case["path"], trusted_modules=case["trusted"])
            result.update(outcome="ok")
    except BaseException as e:  # everything is reported, nothing escapes the child
        result.update(
            outcome="error",
            error_type=type(e).__name__,
            error_module=type(e).__module__,
            message=str(e),
        )
    finally:
        armed[0] = False
    result["stderr"] = stderr.getvalue()
    result["events"] = events
    return result


def run_forked(case: dict) -> dict:
    """Fork, run the case in the child, collect its JSON report (a hang is killed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        try:
            payload = json.dumps(run_case(case)).encode()
        except BaseException as e:
            payload = json.dumps(
                {"id": case["id"], "outcome": "crash", "message": repr(e)}
            ).encode()
        view = memoryview(payload)
        while view:
            view = view[os.write(w, view) :]
        os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + TIMEOUT_S
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return {"id": case["id"], "outcome": "hang", "events": []}
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        return {"id": case["id"], "outcome": "crash", "message": "no report", "events": []}
    return json.loads(data)


def main(argv: list[str]) -> int:
    cases_path, results_path = argv
    with open(cases_path) as f:
        cases = json.load(f)
    sys.path.insert(0, os.getcwd())  # as `python -c` and the CLI's run loading have it
    import importlib
    import pkgutil

    import sklearn.metrics  # noqa: F401  what genuine loads and commands import, before any case
    import timm  # noqa: F401
    import torchvision.models  # noqa: F401

    import frostline

    for info in pkgutil.walk_packages(frostline.__path__, "frostline."):  # the CLI's lazy imports
        importlib.import_module(info.name)
    results = [run_forked(case) for case in cases]
    with open(results_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
