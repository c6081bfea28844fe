"""Every `model.attention` implementation against the einsum reference (itself checked
against NumPy in test_model.py) (fp32, causal, packed segments, grouped kv
heads), the Pallas kernels in interpret mode over several blocks, forward and
gradients, alone and on a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh

from jaxlm.config import ModelConfig, load_config
from jaxlm.errors import ConfigError
from jaxlm.models import build_model, kernels
from jaxlm.models.attention import (
    attention_bias,
    attention_mask,
    einsum_attention,
    jax_dot_product_attention,
    resolve_attention,
)
from jaxlm.models.kernels import flash_attention, splash_attention

TIGHT = dict(rtol=1e-5, atol=1e-5)
GRADS = dict(rtol=1e-4, atol=1e-4)


def _qkv(length, n_heads=4, kv_heads=2, head_dim=8, batch=2):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (batch, length, n_heads, head_dim))
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:])
    return q, k, v


def _segments(length):
    """Row 0 packs three documents and trailing padding (segment 0); row 1 is one."""
    cuts = [length // 3, length // 2, length - 5]
    row0 = np.searchsorted(cuts, np.arange(length), side="right") + 1
    row0[cuts[-1] :] = 0
    return jnp.asarray(np.stack([row0, np.ones(length, int)]))


@pytest.mark.parametrize(
    "kv_heads, window", [(2, 0), (1, 5), (4, 3)], ids=["gqa", "mqa-w5", "mha-w3"]
)
def test_dot_product_matches_einsum(kv_heads, window):
    q, k, v = _qkv(24, kv_heads=kv_heads)
    bias = attention_bias(_segments(24), window=window)
    expected = einsum_attention(q, k, v, bias)
    np.testing.assert_allclose(jax_dot_product_attention(q, k, v, bias), expected, **TIGHT)


def _value_and_grads(fn, q, k, v, *args):
    def f(q, k, v):
        out = fn(q, k, v, *args)
        return (out * jnp.cos(out)).sum(), out

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _assert_matches_reference(got, want):
    (_, out), grads = got
    (_, expected), expected_grads = want
    np.testing.assert_allclose(out, expected, **TIGHT)
    for g, w in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(g, w, **GRADS)


@pytest.mark.parametrize(
    "kernel, length, kv_heads, window",
    [
        ("flash", 512, 2, 0),
        ("flash", 1024, 1, 0),
        ("splash", 512, 2, 0),
        ("splash", 1024, 1, 200),
    ],
    ids=["flash-512-gqa", "flash-1024-mqa", "splash-512-gqa", "splash-1024-mqa-window200"],
)
def test_kernels_over_several_blocks_match_einsum(kernel, length, kv_heads, window):
    """128-row blocks, so the kernels walk 4-8 query and key blocks: causal block
    skipping, documents that cross block edges, padding and a window wider than a
    block all meet the reference, forward and backward."""
    q, k, v = _qkv(length, n_heads=2 * kv_heads, kv_heads=kv_heads, batch=2)
    seg = _segments(length)
    if kernel == "flash":
        got = _value_and_grads(lambda q, k, v: flash_attention(q, k, v, seg, block=128), q, k, v)
    else:
        got = _value_and_grads(
            lambda q, k, v: splash_attention(q, k, v, seg, window, block=128), q, k, v
        )
    want = _value_and_grads(einsum_attention, q, k, v, attention_mask(seg, window=window))
    _assert_matches_reference(got, want)


def test_flash_kernel_under_the_tpu_simulator():
    """The model interprets with Pallas's generic interpreter (remat-safe); the same
    kernel call under the TPU simulator (`InterpretParams()`) gives the same numbers."""
    q, k, v = _qkv(128, kv_heads=4)
    seg = _segments(128)
    to_heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(kernels._flash)(*map(to_heads_first, (q, k, v)), seg)
    expected = einsum_attention(q, k, v, attention_mask(seg))
    np.testing.assert_allclose(to_heads_first(out), expected, **TIGHT)


@pytest.mark.parametrize("kernel", [flash_attention, splash_attention], ids=["flash", "splash"])
def test_kernel_forward_and_gradients_per_shard_on_a_mesh(kernel):
    """Batch and heads sharded, the sequence gathered: the shard_map path on 8 devices,
    two 128-row blocks."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "tensor", "sequence"))
    rules = [("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor")]
    rules += [("length", "sequence")]
    q, k, v = _qkv(256, kv_heads=2)
    seg = _segments(256)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = _value_and_grads(lambda q, k, v: kernel(q, k, v, seg, block=128), q, k, v)
    _assert_matches_reference(got, _value_and_grads(einsum_attention, q, k, v, attention_mask(seg)))


@pytest.mark.parametrize("kernel", [flash_attention, splash_attention], ids=["flash", "splash"])
def test_kernels_refuse_lengths_they_cannot_tile(kernel):
    q, k, v = _qkv(96)
    with pytest.raises(ConfigError, match="needs a multiple of 128") as err:
        jax.jit(kernel)(q, k, v, _segments(96))
    assert err.value.key == "train.seq_len"


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["model.attention=ring"], "model.attention", "einsum or dot_product or flash or splash"),
        (
            ["model.attention=flash", "model.sliding_window=64"],
            "model.sliding_window",
            "flash has no sliding window; use splash",
        ),
        (
            ["model.attention=splash", "model.d_model=384", "model.n_heads=2"],
            "model.n_heads",
            "splash needs head_dim <= 128 or a multiple of 128, not 192",
        ),
    ],
)
def test_bad_attention_settings_name_the_key(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert err.value.key == key


LLAMA = ModelConfig(
    family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
    max_len=128, rope_base=500.0, attention="einsum",
)  # fmt: skip


def test_auto_attention_per_platform():
    """auto is splash on TPU for causal decoders whose heads it tiles, dot_product
    there otherwise and on GPU, the reference on CPU; an explicit choice stays."""
    wide = dataclasses.replace(LLAMA, attention="auto", d_model=4 * 192)  # head_dim 192
    cases = {
        ("llama", "tpu"): "splash",
        ("gpt2", "tpu"): "splash",
        ("t5", "tpu"): "dot_product",
        ("bert", "tpu"): "dot_product",
        ("llama", "gpu"): "dot_product",
        ("llama", "cpu"): "einsum",
    }
    for (family, platform), expected in cases.items():
        config = ModelConfig(family=family, attention="auto")
        assert resolve_attention(config, platform) == expected, (family, platform)
    assert resolve_attention(wide, "tpu") == "dot_product"
    llama = ModelConfig(family="llama", attention="auto")
    assert resolve_attention(llama, "tpu", seq_len=4096) == "splash"
    assert resolve_attention(llama, "tpu", seq_len=100) == "dot_product"  # rows don't tile
    assert resolve_attention(dataclasses.replace(LLAMA, attention="flash"), "cpu") == "flash"


@pytest.mark.parametrize(
    "attention, length, window",
    [("dot_product", 16, 0), ("dot_product", 16, 4), ("flash", 128, 0), ("splash", 128, 6)],
    ids=["dot_product", "dot_product-window4", "flash", "splash-window6"],
)
def test_decoder_logits_match_einsum_from_the_same_weights(attention, length, window):
    cfg = dataclasses.replace(LLAMA, sliding_window=window)
    reference = build_model(cfg)
    params = jax.jit(reference.init)(jax.random.PRNGKey(1), jnp.zeros((1, length), jnp.int32))
    params = nn.meta.unbox(params)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, length), 0, cfg.vocab_size)
    seg = _segments(length)
    starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1) != 0, np.arange(length), 0), 1)
    positions = jnp.asarray(np.arange(length) - starts)
    other = build_model(dataclasses.replace(cfg, attention=attention))
    np.testing.assert_allclose(
        jax.jit(other.apply)(params, tokens, seg, positions),
        jax.jit(reference.apply)(params, tokens, seg, positions),
        **TIGHT,
    )


def test_flash_decoder_gradients_under_remat():
    """Remat's partial evaluation refuses effects, so this guards the interpreter choice."""
    cfg = dataclasses.replace(LLAMA, n_layers=1)
    reference = build_model(cfg)
    params = jax.jit(reference.init)(jax.random.PRNGKey(1), jnp.zeros((1, 128), jnp.int32))
    params = nn.meta.unbox(params)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 128), 0, cfg.vocab_size)
    seg = _segments(128)

    def grads(model):
        return jax.jit(jax.grad(lambda p: model.apply(p, tokens, seg).std()))(params)

    flash = build_model(dataclasses.replace(cfg, attention="flash", remat="full"))
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
        grads(flash),
        grads(reference),
    )
