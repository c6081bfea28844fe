"""`jaxlm compile` says DOES NOT FIT only for the compiler's out-of-memory status."""

import pytest
from jax.errors import JaxRuntimeError

from jaxlm.aot import compile_train_step, parse_topology
from jaxlm.config import load_config
from jaxlm.train.step import InMesh

from .conftest import TINY

pytest.importorskip("libtpu", reason="libtpu is in the test extra: pip install -e '.[test]'")


class _Lowered:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def as_text(self) -> str:
        return ""

    def compile(self):
        raise self.error


@pytest.mark.parametrize(
    "message, fits",
    [
        ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 40.0G of 16.0G", False),
        ("INTERNAL: Mosaic failed to compile: unsupported vector memory layout", None),
    ],
)
def test_only_out_of_memory_is_does_not_fit(monkeypatch, message, fits):
    """A compile error that merely mentions memory is raised, not reported as not fitting."""
    monkeypatch.setattr(InMesh, "lower", lambda self, *a: _Lowered(JaxRuntimeError(message)))
    config = load_config(None, [*TINY, "mesh.data=1", "mesh.fsdp=4"])
    if fits is None:
        with pytest.raises(JaxRuntimeError, match="Mosaic"):
            compile_train_step(config, parse_topology("v5e-2x2"))
    else:
        report = compile_train_step(config, parse_topology("v5e-2x2"))
        assert report.error.startswith("RESOURCE_EXHAUSTED") and report.fits is fits
