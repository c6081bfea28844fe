"""`jaxlm.models` is a leaf: research code imports it without the trainer's stack."""

import json
import subprocess
import sys

from .conftest import REPO

FORBIDDEN = ("omegaconf", "etils", "grain", "orbax", "tensorstore", "optax", "sentencepiece")
ALLOWED_JAXLM = ("jaxlm", "jaxlm.errors", "jaxlm.model_config")
# jax itself imports parts of etils (epath), so what counts is what jaxlm.models adds
# to the modules that jax, flax and numpy bring.
CODE = """
import json, sys
import flax.linen, jax, numpy
before = set(sys.modules)
import jaxlm.models
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_models_import_only_jax_flax_numpy_and_the_model_config():
    added = json.loads(
        subprocess.run(
            [sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    )
    assert not [m for m in added if m.split(".")[0] in FORBIDDEN]
    jaxlm = [m for m in added if m.split(".")[0] == "jaxlm"]
    assert "jaxlm.models.decoder" in jaxlm
    outside = [m for m in jaxlm if m not in ALLOWED_JAXLM and not m.startswith("jaxlm.models")]
    assert not outside, outside
