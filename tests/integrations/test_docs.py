"""docs/integrations.md and the README's integrations section run as written."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"


def blocks(text: str) -> list[tuple[str, str | None]]:
    """Each ```python block with the ```text block right after it (its printed output), if any."""
    out = []
    for m in re.finditer(r"```python\n(.*?)```(?:\s*```text\n(.*?)```)?", text, flags=re.S):
        out.append((m.group(1), m.group(2)))
    return out


@pytest.mark.parametrize("index,name", [(0, "fl.track("), (1, "fl.FrozenFeatures(")])
def test_the_plain_loop_examples_print_what_the_doc_shows(tmp_path, monkeypatch, index, name):
    code, shown = blocks(DOC.read_text())[index]
    assert name in code and shown
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/integrations.md", "exec"), {})
    assert printed.getvalue().strip() == shown.strip()


def test_the_readme_section_is_the_docs_loop():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Where you already train", 1)[1].split("\n## ", 1)[0]
    code = blocks(section)[0][0]
    assert "fl.track(opt, model" in code and "docs/integrations.md" in section
    doc = blocks(DOC.read_text())[0][0]
    for line in code.strip().splitlines():
        assert line.strip() in doc, f"README line not in the docs example: {line!r}"
    # with the docs' set-up (model, loader, frozen base) it runs and trains the unfrozen layer
    setup = doc.split("opt = ", 1)[0]
    env: dict = {}
    exec(compile(setup + code, "README.md", "exec"), env)
    opt, model = env["opt"], env["model"]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert opt.param_groups[1]["params"][0] is model.module[2].weight


@pytest.mark.slow
@pytest.mark.parametrize("index,library", [(2, "lightning"), (3, "transformers")])
def test_the_library_examples_run(tmp_path, index, library):
    pytest.importorskip(library)
    code, _ = blocks(DOC.read_text())[index]
    assert library in code
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "frozen weights verified" in proc.stdout
