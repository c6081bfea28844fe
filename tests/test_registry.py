"""The family registry: every family is declared once, in `jaxlm.model_config.FAMILIES`,
and nothing else in the package asks which family it has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import jaxlm.models
from jaxlm.model_config import FAMILIES, ModelConfig
from jaxlm.train.objectives import OBJECTIVES

PACKAGE = Path(jaxlm.models.__file__).parents[1]
# `family ==`, `family !=`, `family in (`, `.family == ` and the like, by name.
FAMILY_TEST = re.compile(r"(?<!for )\bfamily\s*(==|!=|in\s*\(|not\s+in\s*\()|\.family\s*==")


def test_no_family_comparisons_outside_the_registry():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "model_config.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FAMILY_TEST.search(line)
    ]
    assert not found, "test attributes of FAMILIES[...] instead:\n" + "\n".join(found)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_names_things_that_exist(name):
    family = FAMILIES[name]
    assert isinstance(getattr(jaxlm.models, family.module), type)
    assert family.kind in ("decoder", "encoder", "encoder_decoder")
    assert family.objective in OBJECTIVES and family.data in ("packed", "mlm_nsp", "seq2seq")
    if family.hf:
        __import__(f"jaxlm.hf.{family.hf}")
        assert family.hf_architectures
    config = ModelConfig(family=name, vocab_size=64, d_model=32, n_heads=2, max_len=16)
    assert family.flops_per_token(config, 10_000, 16) > 0
    model = jaxlm.models.build_model(config, platform="cpu")
    assert type(model).__name__ == family.module and model.config.attention != "auto"
