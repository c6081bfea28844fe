"""A checkpoint written under one mesh resumes under another with the same losses."""

import shutil

import jax
import numpy as np

from jaxlm.train.loop import train


def test_fsdp_checkpoint_resumes_on_a_data_tensor_mesh(tiny_config, tmp_path):
    # One checkpoint, where the first session stops: periodic saves would add nothing.
    config = tiny_config.replace(train={"steps": 8}, checkpoint={"every": 1000})
    saved = tmp_path / "fsdp8"
    first = train(config.replace(mesh={"data": 1, "fsdp": 8}), saved, progress=False, stop_at=4)
    assert [r["step"] for r in first.history] == list(range(1, 5))
    shutil.copytree(saved, tmp_path / "replicated")
    shutil.copytree(saved, tmp_path / "tensor")

    # data=8 holds every parameter whole on every device: the unsharded reference.
    ref = train(config.replace(mesh={"data": 8}), tmp_path / "replicated", progress=False)
    moved = train(
        config.replace(mesh={"data": 2, "tensor": 4}), tmp_path / "tensor", progress=False
    )
    query = moved.state.params["layers"]["attn"]["query"]["kernel"]
    assert query.sharding.spec[2] == "tensor"
    assert query.addressable_shards[0].data.shape == (2, 64, 1, 16)
    assert [r["step"] for r in moved.history] == list(range(5, 9))
    ref_losses = np.array([r["loss"] for r in ref.history])
    np.testing.assert_allclose([r["loss"] for r in moved.history], ref_losses, atol=2e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
        jax.device_get(moved.state.params),
        jax.device_get(ref.state.params),
    )
