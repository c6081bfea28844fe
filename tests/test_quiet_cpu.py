"""On a machine without a TPU, jaxlm commands print no libtpu probe errors, with
JAX_PLATFORMS unset (libtpu is installed by the test extra)."""

import glob
import os
import subprocess
import sys

import pytest

from jaxlm.cli import _ACCELERATOR_DEVICES

from .conftest import REPO

PROBE_NOISE = ("TPU accelerator type", "worker hostname", "libtpu")


@pytest.mark.skipif(
    any(glob.glob(p) for p in _ACCELERATOR_DEVICES), reason="an accelerator is attached"
)
def test_info_without_a_tpu_prints_no_probe_errors():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    out = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "info", "configs/shakespeare.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "parameters:" in out.stdout
    assert not [n for n in PROBE_NOISE if n in out.stderr], out.stderr


def test_tpu_variables_leave_jax_alone(monkeypatch):
    """On a TPU VM (here: its variables) nothing is set, so real TPU errors still show."""
    from jaxlm.cli import quiet_without_accelerator

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    quiet_without_accelerator()
    assert "JAX_PLATFORMS" not in os.environ
