"""The README's code examples run as written."""

import re

import numpy as np

from .conftest import REPO


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_use_the_modules_in_your_own_code():
    scope: dict = {}
    exec(readme_block("Use the modules in your own code"), scope)
    assert scope["logits"].shape == (2, 16, 1000)
    assert scope["logits"].dtype == np.float32
    assert tuple(scope["specs"]) == ("layers", "embed", "heads", "head_dim")


def readme_commands() -> list[str]:
    """The one-line commands of the README's Quick start, in order."""
    text = (REPO / "README.md").read_text().split("## Quick start\n", 1)[1]
    text = text.split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_commands_as_written():
    """A newcomer runs the README's two commands; CI must run the very same ones."""
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert all("-c requirements/test-lock.txt" in c for c in commands)
    ci = (REPO / ".ci" / "run").read_text()
    assert all(f"time ({c})" in ci for c in commands)
    assert "python3 -m venv" in ci
