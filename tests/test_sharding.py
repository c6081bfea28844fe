"""One train step on 8 emulated devices equals the same step on one device."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxlm import sharding as shd
from jaxlm.config import MeshConfig, load_config
from jaxlm.errors import JaxlmError
from jaxlm.models import build_model
from jaxlm.train.optim import make_optimizer, make_schedule
from jaxlm.train.state import init_state, state_shardings
from jaxlm.train.step import jit_steps, make_eval_step, make_train_step

from .conftest import TINY


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.train.seq_len)
    inputs = rng.integers(4, config.model.vocab_size, shape).astype(np.int32)
    segment_ids = np.ones(shape, np.int32)
    segment_ids[:, 40:] = 2
    segment_ids[0, 60:] = 0  # some padding
    positions = np.concatenate([np.arange(40), np.arange(shape[1] - 40)])[None].repeat(shape[0], 0)
    return {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "segment_ids": segment_ids,
        "positions": positions.astype(np.int32),
    }


def one_step(config, mesh_config, devices):
    """Init + one train step on a mesh; returns (loss, params, state shardings)."""
    config = config.replace(model={"vocab_size": 512})
    mesh = shd.make_mesh(mesh_config, devices)
    rules = shd.logical_rules(mesh_config)
    model = build_model(config.model)
    tx = make_optimizer(config.optim, 10)
    _, shardings = state_shardings(model, tx, config.train.seq_len, mesh, rules)
    state = init_state(
        model, tx, config.train.seq_len, shardings, jax.random.PRNGKey(0), mesh, rules
    )
    train_step, _ = jit_steps(
        make_train_step(model, tx, make_schedule(config.optim, 10)),
        make_eval_step(model),
        shardings,
        mesh,
        rules,
    )
    data = shd.batch_sharding(mesh, rules)
    batch = {k: jax.device_put(v, data) for k, v in _batch(config).items()}
    state, metrics = train_step(state, batch)
    return float(metrics["loss"]), jax.device_get(state.params), state.params, state.opt_state


@pytest.fixture(scope="module")
def reference():
    config = load_config(None, [*TINY, "optim.warmup_steps=0", "optim.eps=1e-6"])
    loss, params, _, opt_state = one_step(config, MeshConfig(data=1), jax.devices()[:1])
    return config, loss, params, jax.device_get(opt_state)


@pytest.mark.parametrize(
    "mesh_config, param, shard_shape",
    [
        (MeshConfig(data=8), ("embed", "embedding"), (512, 64)),
        (MeshConfig(data=1, fsdp=8), ("embed", "embedding"), (512, 8)),
        (
            MeshConfig(data=2, fsdp=2, tensor=2),
            ("layers", "attn", "query", "kernel"),
            (2, 32, 2, 16),
        ),
        (MeshConfig(data=1, fsdp=4, tensor=2), ("layers", "mlp", "fc_in", "kernel"), (2, 16, 128)),
        (
            MeshConfig(data=1, fsdp=4, sequence=2),
            ("layers", "attn", "out", "kernel"),
            (2, 4, 16, 16),
        ),
        (MeshConfig(data=8, strategy="data"), ("layers", "mlp", "fc_in", "kernel"), (2, 64, 256)),
    ],
    ids=["data8", "fsdp8", "data2-fsdp2-tensor2", "fsdp4-tensor2", "fsdp4-sequence2", "dp-preset"],
)
def test_sharded_step_matches_single_device(reference, mesh_config, param, shard_shape):
    config, ref_loss, ref_params, ref_opt = reference
    loss, params, live, opt_state = one_step(config, mesh_config, jax.devices())
    assert abs(loss - ref_loss) < 1e-5
    # Adam moves every weight by about lr; the sharded step must agree to 0.2% of that.
    atol = 2e-3 * config.optim.lr
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol), params, ref_params
    )
    # Adam's first moment is (1 - b1) * gradient: the gradients match too.
    mu, ref_mu = _first_moment(opt_state), _first_moment(ref_opt)
    scale = max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(ref_mu))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale), mu, ref_mu
    )
    leaf = live
    for key in param:
        leaf = leaf[key]
    assert leaf.addressable_shards[0].data.shape == shard_shape  # laid out as the rules say


def _first_moment(opt_state):
    found = [
        s.mu
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ]
    assert len(found) == 1
    return jax.device_get(found[0])


def test_strategy_presets_and_overrides():
    rules = dict(shd.logical_rules(MeshConfig(fsdp=4, sequence=2)))
    assert rules["length"] == "sequence" and rules["batch"] == ("data", "fsdp")
    assert rules["embed"] == "fsdp" and rules["heads"] == "tensor"
    dp = dict(shd.logical_rules(MeshConfig(strategy="data")))
    assert dp["batch"] == "data" and dp["embed"] is None and dp["length"] is None
    cfg = load_config(None, [*TINY, "mesh.strategy=fsdp", "mesh.rules.vocab=[fsdp]"])
    rules = dict(shd.logical_rules(cfg.mesh))
    assert rules["vocab"] == "fsdp" and rules["heads"] is None and rules["embed"] == "fsdp"


def test_impossible_meshes_are_refused(tiny_config):
    with pytest.raises(
        JaxlmError, match="mesh: data=3 x fsdp=1 x tensor=1 x sequence=1 needs 3 devices, have 8"
    ):
        shd.make_mesh(MeshConfig(data=3))
    with pytest.raises(JaxlmError, match="8 devices cannot be split with fsdp=3"):
        shd.make_mesh(MeshConfig(data=-1, fsdp=3))
    mesh_config = MeshConfig(data=1, tensor=8)
    mesh, rules = shd.make_mesh(mesh_config), shd.logical_rules(mesh_config)
    model = build_model(dataclasses.replace(tiny_config.model, vocab_size=512))
    with pytest.raises(
        JaxlmError,
        match=r"params/layers/attn/key/bias dimension 1 \(size 4\) cannot be split over mesh axes",
    ):
        state_shardings(model, make_optimizer(tiny_config.optim, 10), 64, mesh, rules)


@pytest.mark.parametrize(
    "mesh_config, message",
    [
        (MeshConfig(data=1, fsdp=8, strategy="data"), "'mesh.fsdp': 8 devices, but no rule"),
        (MeshConfig(data=1, tensor=8), r"key/bias dimension 1 \(size 4\) cannot be split"),
        (
            MeshConfig(data=1, fsdp=2, tensor=4, rules={"heads": []}),
            r"layers/mlp/fc_in/bias dimension 1 \(size 102\) cannot be split over mesh axes",
        ),
    ],
    ids=["unused-axis", "heads", "hidden"],
)
def test_meshes_that_cannot_work_are_refused_before_compiling(tiny_config, mesh_config, message):
    model = build_model(dataclasses.replace(tiny_config.model, vocab_size=512, d_ff=102))
    with pytest.raises(JaxlmError, match=message):
        mesh = shd.make_mesh(mesh_config)
        state_shardings(
            model, make_optimizer(tiny_config.optim, 10), 64, mesh, shd.logical_rules(mesh_config)
        )


def test_batch_and_rows_must_divide_their_axes():
    mesh_config = MeshConfig(data=2, fsdp=2, sequence=2)
    mesh = shd.make_mesh(mesh_config)
    data = shd.batch_sharding(mesh, shd.logical_rules(mesh_config))
    assert data.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "sequence")
    shd.check_batch(8, data, 64)
    with pytest.raises(JaxlmError, match="'train.batch_size': 6 cannot be split over 4 devices"):
        shd.check_batch(6, data, 64)
    with pytest.raises(JaxlmError, match="'train.seq_len': 63 cannot be split over 2 devices"):
        shd.check_batch(8, data, 63)
    with pytest.raises(JaxlmError, match="mesh.strategy': unknown strategy 'zero3'"):
        load_config(None, ["mesh.strategy=zero3"])
