"""Shared fixtures. XLA_FLAGS must be set before JAX is imported anywhere."""

import os
import tempfile

# Tests check numbers, not speed: with XLA's backend optimisations off every CPU compile
# takes about half the time, and compiling is most of the suite's time.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 8, optimized: bool = False) -> str:
    """XLA_FLAGS for this process and every `jaxlm` subprocess a test starts."""
    return f"--xla_force_host_platform_device_count={devices}" + (
        "" if optimized else f" {FAST_COMPILE}"
    )


def subprocess_env(devices: int = 8, optimized: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a `jaxlm` subprocess: `devices` emulated CPU devices, the
    session's caches, no TPU probing. `optimized` keeps XLA's optimisations, for runs of
    hundreds of steps, where running the program outweighs compiling it."""
    flags = xla_flags(devices, optimized)
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags()).strip()
os.environ.setdefault("JAXLM_CACHE_DIR", tempfile.mkdtemp(prefix="jaxlm-test-cache-"))
# One XLA compilation cache for the session, inherited by every `jaxlm` subprocess: the
# suite compiles the same tiny train step in dozens of processes, and a cache hit skips
# XLA's compile (tracing and lowering still run, so the programs are still built by jaxlm).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["JAXLM_CACHE_DIR"], "xla")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tests run on emulated CPU devices; with libtpu installed (the test extra has it for
# `jaxlm compile`) JAX would otherwise probe for a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402  (below: JAX reads the environment on import)

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "tinyshakespeare.txt"

TINY = [
    f"data.path={CORPUS}",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.max_len=64",
    "tokenizer.vocab_size=512",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "optim.lr=3e-3",
    "optim.warmup_steps=5",
    "checkpoint.every=5",
    "train.tensorboard=false",  # tests/test_observe.py turns it on
]


def pytest_configure(config):
    assert jax.device_count() == 8, "tests need 8 emulated devices; JAX was imported too early"


# The modules with the longest runs (subprocess pairs, CLI learning runs), longest first.
# pytest-xdist hands whole files to its workers in collection order (pyproject turns off
# its reordering by test count), so starting these first lets the workers finish
# together instead of one running a long file alone at the end.
SLOWEST_FIRST = [
    "test_reliability.py",
    "test_bert.py",
    "test_multihost.py",
    "test_data_scale.py",
    "test_t5.py",
    "test_gcs_emulator.py",
    "test_sharding.py",
    "test_attention.py",
    "test_aot.py",
    "test_observe.py",
    "test_sft.py",
    "test_bert_qa_train.py",
    "test_shards.py",
    "test_eval.py",
    "test_train.py",
    "test_hf.py",
    "test_mesh_restore.py",
    "test_generate.py",
    "test_lora.py",
    "test_grad_accum.py",
    "test_model.py",
    "test_train_families.py",
    "test_cli.py",
    "test_t5_hf.py",
    "test_span_corruption.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest


@pytest.fixture
def tiny_config() -> Config:
    """A model small enough to compile and train in seconds on 2 cores."""
    return load_config(None, [*TINY, "name=tiny"])
