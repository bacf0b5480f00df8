"""The integrations' libraries are optional: importing frostline never imports them."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_import_frostline_imports_neither_library():
    code = (
        "import sys, frostline, frostline.integrations;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
