"""Every `model.attention` implementation against the einsum reference (fp32, causal,
packed segments, grouped kv heads), the Pallas kernels in TPU interpret mode included."""

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
    CAUSAL_BLOCK,
    attention_bias,
    attention_mask,
    dot_product_attention,
    xla_dot_product_attention,
)
from jaxlm.models.kernels import flash_attention, splash_attention

TIGHT = dict(rtol=1e-5, atol=1e-5)


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
    expected = dot_product_attention(q, k, v, bias)
    np.testing.assert_allclose(xla_dot_product_attention(q, k, v, bias), expected, **TIGHT)


@pytest.mark.parametrize("window", [0, 150])
def test_causal_blocks_match_the_full_square(window):
    """Blocks of CAUSAL_BLOCK queries over the keys they may see give the full masked
    square's outputs and gradients (packed segments, padding, grouped heads), whether
    the mask is a boolean or an additive bias."""
    length = 3 * CAUSAL_BLOCK
    q, k, v = _qkv(length)
    mask = attention_mask(_segments(length), window=window)

    def loss(causal, bias):
        def f(q, k, v):
            return jnp.sum(jnp.sin(dot_product_attention(q, k, v, bias, causal=causal)))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    expected, expected_grads = loss(False, mask)
    for bias in (mask, attention_bias(_segments(length), window=window)):
        value, grads = loss(True, bias)
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        for got, want in zip(grads, expected_grads, strict=True):
            np.testing.assert_allclose(got, want, **TIGHT)


@pytest.mark.parametrize(
    "kernel, kv_heads, window",
    [
        (flash_attention, 2, 0),
        (flash_attention, 1, 0),
        (splash_attention, 2, 0),
        (splash_attention, 1, 5),
    ],
    ids=["flash-gqa", "flash-mqa", "splash-gqa", "splash-mqa-window5"],
)
def test_kernel_matches_einsum_forward_and_backward(kernel, kv_heads, window):
    """128 is the kernels' smallest sequence with segment ids (one kv block)."""
    q, k, v = _qkv(128, kv_heads=kv_heads)
    seg = _segments(128)
    bias = attention_bias(seg, window=window)
    args = (seg, window) if window else (seg,)

    def loss(fn, *args):
        def f(q, k, v):
            out = fn(q, k, v, *args)
            return (out * jnp.cos(out)).sum(), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), grads = loss(kernel, *args)
    (_, expected), expected_grads = loss(dot_product_attention, bias)
    np.testing.assert_allclose(out, expected, **TIGHT)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_flash_kernel_under_the_tpu_simulator():
    """The model interprets with Pallas's generic interpreter (remat-safe); the same
    kernel call under the TPU simulator (`InterpretParams()`) gives the same numbers."""
    q, k, v = _qkv(128, kv_heads=4)
    seg = _segments(128)
    to_heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(kernels._flash)(*map(to_heads_first, (q, k, v)), seg)
    expected = dot_product_attention(q, k, v, attention_bias(seg))
    np.testing.assert_allclose(to_heads_first(out), expected, **TIGHT)


@pytest.mark.parametrize("kernel", [flash_attention, splash_attention], ids=["flash", "splash"])
def test_kernel_runs_per_shard_on_a_mesh(kernel):
    """Batch and heads sharded, the sequence gathered: the shard_map path, 8 devices."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "tensor", "sequence"))
    rules = [("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor")]
    rules += [("length", "sequence")]
    q, k, v = _qkv(128, kv_heads=2)
    seg = _segments(128)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(kernel)(q, k, v, seg)
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, attention_bias(seg)), **TIGHT)


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
    max_len=128, rope_base=500.0,
)  # fmt: skip


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
