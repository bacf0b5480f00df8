"""The README starts with exactly two commands, and CI runs them verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", head, flags=re.S)]


def test_readme_starts_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("frostline demo") and "pip install" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for cmd in readme_commands():
        assert cmd in ci, f"{cmd!r} is not a line of .ci/run"


def test_readme_tour_runs():
    """The README's tour, executed on a few small random images."""
    import numpy as np

    text = (ROOT / "README.md").read_text()
    tour = re.findall(r"## A tour.*?```python\n(.*?)```", text, flags=re.S)[0]
    rng = np.random.default_rng(0)
    env = {"x": rng.random((16, 3, 32, 32), dtype=np.float32), "y": np.arange(16) % 10}
    exec(compile(tour, "README.md tour", "exec"), env)
    model, base = env["model"], env["base"]
    assert model.last_verification.ok
    assert 0 < len(base.trainable_weights) < len(base.weights)
