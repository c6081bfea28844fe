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
