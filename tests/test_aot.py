"""`jaxlm compile`: the real train step compiled for a TPU slice by libtpu, on this CPU."""

import math
import subprocess
import sys

import pytest

from jaxlm.aot import compile_train_step, parse_topology
from jaxlm.config import load_config
from jaxlm.errors import JaxlmError

from .conftest import REPO, TINY, subprocess_env

pytest.importorskip("libtpu", reason="libtpu is in the test extra: pip install -e '.[test]'")

GIB = 1024**3


@pytest.mark.parametrize(
    "name, libtpu_name, chips",
    [
        ("v5p-128", "v5p:4x4x4", 64),  # v5p names count TensorCores, two per chip
        ("v5p-512", "v5p:4x8x8", 256),
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5e-2x2", "v5e:2x2", 4),
        ("v5e-8", "v5e:2x4", 8),
        ("v6e-256", "v6e:16x16", 256),
    ],
)
def test_topology_names(name, libtpu_name, chips):
    topology = parse_topology(name)
    assert (topology.libtpu_name, topology.chips) == (libtpu_name, chips)


@pytest.mark.parametrize("name", ["v9-8", "v5p-3", "v5e-2x2x2", "tpu"])
def test_bad_topology_names(name):
    with pytest.raises(JaxlmError, match=f"--topology '{name}'"):
        parse_topology(name)


def _tiny(*overrides):
    return load_config(None, [*TINY, "model.vocab_size=512", *overrides])


def test_sharding_divides_the_state_across_chips():
    """FSDP keeps 1/4 of the state per chip, data parallelism all of it; donation aliases it."""
    v5e = parse_topology("v5e-2x2")
    fsdp = compile_train_step(_tiny("mesh.data=1", "mesh.fsdp=4"), v5e, top=1000)
    dp = compile_train_step(_tiny("mesh.data=4", "mesh.strategy=data"), v5e, top=1000)
    assert fsdp.fits and dp.fits
    state_fsdp = sum(a.shard_bytes for a in fsdp.largest)
    state_dp = sum(a.shard_bytes for a in dp.largest)
    full = sum(math.prod(a.shape) * 4 for a in dp.largest)
    assert state_dp == full and state_fsdp < full / 3  # a few small arrays stay whole
    # TPU tiles pad small arrays, so XLA's figures are at least the shards, and ordered.
    assert fsdp.argument_bytes >= state_fsdp and dp.argument_bytes >= state_dp
    assert fsdp.argument_bytes < dp.argument_bytes
    # The donated state comes back in place: only the scalar metrics are new outputs.
    assert fsdp.output_bytes - fsdp.alias_bytes < 4096
    n_tokens = 8 * 64
    assert fsdp.flops_per_step > 6 * fsdp.n_params * n_tokens * 0.9
    assert fsdp.xla_flops_per_chip > 0


def test_logits_that_cannot_fit_are_reported(tmp_path):
    """A 16k-row batch of 32k-vocab logits needs 32 GiB per chip on a v5e-2x2 (16 GiB)."""
    env = subprocess_env()
    args = [*TINY, "model.vocab_size=32768", "train.batch_size=16384", "mesh.data=1"]
    command = [sys.executable, "-m", "jaxlm.cli", "compile", *args, "mesh.fsdp=4", "--topology"]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2 and "expected one argument" in out.stderr
    out = subprocess.run(
        [*command, "v5e-2x2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "v5e:2x2, 4 chips, 16.00 GiB HBM per chip" in out.stdout
    assert "mesh: data=1 x fsdp=4 x tensor=1 x sequence=1" in out.stdout
    assert out.stdout.rstrip().endswith("DOES NOT FIT")
    total = next(line for line in out.stdout.splitlines() if line.strip().startswith("total"))
    logits_per_chip = 16384 // 4 * 64 * 32768 * 4
    assert float(total.split()[1]) * GIB > logits_per_chip


def test_multislice_meshes_put_data_parallelism_across_slices():
    from jaxlm import sharding as shd
    from jaxlm.aot import topology_devices
    from jaxlm.config import MeshConfig

    devices = topology_devices(parse_topology("v5e-2x2"), slices=2)
    assert len(devices) == 8
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=4), devices)
    for row, slice_index in zip(mesh.devices, (0, 1), strict=True):
        assert {d.slice_index for d in row.flat} == {slice_index}  # fsdp stays inside a slice
    with pytest.raises(JaxlmError, match="'mesh.data': 1 is not a multiple of the 2 slices"):
        shd.make_mesh(MeshConfig(data=1, fsdp=8), devices)


def test_default_attention_compiles_the_splash_kernel_for_tpu():
    """model.attention=auto resolves for the mesh's devices: splash for a llama on a TPU
    topology, though this host is a CPU; an explicit einsum has no kernel."""
    llama = ["model.family=llama", "train.seq_len=128", "model.max_len=128"]
    v5e = parse_topology("v5e-2x2")
    auto = compile_train_step(_tiny(*llama, "mesh.data=1", "mesh.fsdp=4"), v5e)
    assert any(k.startswith("splash_mqa_fwd") for k in auto.kernels), auto.kernels
    assert any("dkv" in k for k in auto.kernels)  # the backward pass too
    einsum = compile_train_step(
        _tiny(*llama, "mesh.data=1", "mesh.fsdp=4", "model.attention=einsum"), v5e
    )
    assert einsum.kernels == []
