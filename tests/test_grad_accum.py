"""train.grad_accum: the batch split into microbatches inside the step gives the update of
one pass over the whole batch, on a sharded mesh too, with less memory; a batch that
doesn't split is refused, naming the key, before anything compiles."""

import jax
import numpy as np
import pytest

from jaxlm import sharding as shd
from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.train.loop import train
from jaxlm.train.objectives import for_family
from jaxlm.train.step import batch_shardings, train_steps

from .conftest import TINY


def _config(*overrides):
    # One (scanned) layer: half the compile time. No warmup: the first step moves the
    # params, by Adam's lr-sized steps.
    return load_config(
        None,
        [*TINY, "model.n_layers=1", "model.vocab_size=512", "optim.warmup_steps=0", *overrides],
    )


def _initial_state(abstract):
    """A TrainState of random weights made on the host: no init program to compile."""
    rng = np.random.default_rng(0)

    def param(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    params = jax.tree_util.tree_map_with_path(param, abstract.params)
    return zeros.replace(params=params, rng=np.asarray(jax.random.PRNGKey(0)))


def _batch(config, seed=0):
    """A batch of the config's family whose rows hold different numbers of counted
    tokens (padding; BERT's masked tokens), so the microbatches' counts differ: there a
    mean of the microbatches' means would not be the batch's mean."""
    rng = np.random.default_rng(seed)
    t = config.train
    shapes = for_family(config.model.family).batch_shapes(t.batch_size, t.seq_len)
    b, length = t.batch_size, t.seq_len
    real = np.arange(length)[None] < (length - 7 * np.arange(b) % (length - 8))[:, None]
    batch = {}
    for key, shape in shapes.items():
        if key in ("segment_ids", "input_mask", "target_mask"):
            batch[key] = real
        elif key == "positions":
            batch[key] = np.broadcast_to(np.arange(length), shape)
        elif key == "token_types":
            batch[key] = np.broadcast_to(np.arange(length) >= length // 2, shape)
        elif key == "mlm_mask":  # row r chooses about (r + 1) / 2b of its tokens
            batch[key] = (rng.random(shape) < (np.arange(b)[:, None] + 1) / (2 * b)) & real
        elif key == "nsp_labels":
            batch[key] = rng.integers(0, 2, shape)
        else:
            batch[key] = rng.integers(4, config.model.vocab_size, shape)
    return {k: np.asarray(v, np.int32) for k, v in batch.items()}


def _steps(config, devices, accums=(1, 4)):
    """One train step from the same initial state and batch for each train.grad_accum:
    {grad_accum: (metrics, params, Adam's first moment, temp bytes per device)}."""
    mesh = shd.make_mesh(config.mesh, devices)
    rules = shd.logical_rules(config.mesh)
    ranks = for_family(config.model.family).batch_ranks
    batch = jax.device_put(_batch(config), batch_shardings(mesh, rules, ranks))
    out, init = {}, None
    for n in accums:
        _, abstract, shardings, _, (step, _) = train_steps(
            config.replace(train={"grad_accum": n}), mesh, rules
        )
        init = _initial_state(abstract) if init is None else init  # on the host
        compiled = step.lower(init, batch).compile()
        state, metrics = compiled(jax.device_put(init, shardings), batch)
        leaves = jax.tree_util.tree_leaves(state.opt_state, is_leaf=_has_mu)
        (mu,) = [s.mu for s in leaves if _has_mu(s)]
        temp = compiled.memory_analysis().temp_size_in_bytes
        out[n] = (*jax.device_get((metrics, state.params, mu)), temp)
    return out


def _has_mu(x):
    return hasattr(x, "mu")


def _assert_same_update(whole, accumulated):
    (m1, p1, mu1, _), (m2, p2, mu2, _) = whole, accumulated
    assert m1.keys() == m2.keys()
    for key in m1:  # loss, tokens, grad_norm, BERT's accuracies...
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-5, err_msg=key)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p2, p1)
    # Adam's first moment is (1 - b1) times the gradient: the gradients agree too.
    scale = max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(mu1))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), mu2, mu1
    )


def test_accumulated_step_on_a_sharded_mesh_equals_one_pass_with_less_memory():
    """gpt2, padded rows, data=4 x fsdp=2: 4 microbatches of 8 rows, each over all 8
    devices; the accumulator has the params' FSDP sharding."""
    config = _config("mesh.data=4", "mesh.fsdp=2", "train.batch_size=32")
    steps = _steps(config, jax.devices())
    _assert_same_update(steps[1], steps[4])
    assert steps[1][0]["tokens"] < 32 * 64  # the padding is not counted
    # The activations of 8 rows, not 32, are live (XLA's figure for a CPU device).
    assert steps[4][3] < 0.6 * steps[1][3], (steps[4][3], steps[1][3])


def test_accumulated_bert_step_equals_one_pass():
    """MLM + NSP: the microbatches choose different numbers of masked tokens, and the
    loss adds a per-token mean to a per-row one; both come out as the whole batch's."""
    config = _config("model.family=bert", "mesh.data=1")
    steps = _steps(config, jax.devices()[:1])
    _assert_same_update(steps[1], steps[4])
    mask = _batch(config)["mlm_mask"]
    counts = [mask[i::4].sum() for i in range(4)]  # the microbatches' rows i, i+4
    assert len(set(counts)) > 1, counts


def test_batches_that_do_not_split_are_refused_naming_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'train.grad_accum': train.batch_size 8 does not split"):
        _config("train.grad_accum=3")
    with pytest.raises(ConfigError, match="'train.grad_accum': must be positive"):
        _config("train.grad_accum=0")
    # 8 rows in 4 microbatches of 2 can't be spread over 8 data-parallel devices: refused
    # before data (there is none), tokenizer or compile; `jaxlm train` exits with 2.
    message = (
        "config key 'train.grad_accum': 4 microbatches of 2 rows (train.batch_size 8) "
        "cannot each be split over the 8 devices of mesh axes ('data', 'fsdp')"
    )
    with pytest.raises(JaxlmError) as err:
        train(_config("train.grad_accum=4", "data.path=missing.txt"), tmp_path)
    assert str(err.value) == message
    assert main(["train", *TINY, "train.grad_accum=4", "--run-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"jaxlm: error: {message}\n"
