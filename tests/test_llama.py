"""The Llama-style decoder against a NumPy re-implementation, and its config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxlm.config import ModelConfig, load_config
from jaxlm.errors import ConfigError
from jaxlm.info import count_params
from jaxlm.models import build_model

TINY_LLAMA = ModelConfig(
    family="llama",
    vocab_size=61,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    max_len=32,
    rope_base=500.0,  # small, so positions in a 12-token row rotate visibly
)


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_LNH, positions_L, base):
    """Rotation as complex multiplication of (first half + i * second half)."""
    half = x_LNH.shape[-1] // 2
    z = x_LNH[..., :half] + 1j * x_LNH[..., half:]
    freqs = base ** (-np.arange(half) * 2.0 / x_LNH.shape[-1])
    z = z * np.exp(1j * positions_L[:, None, None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def reference_logits(cfg, params, tokens_L, segments_L, positions_L):
    """One row through the Llama architecture in float64, written from the papers."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    n_heads, kv_heads, head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    length = len(tokens_L)
    allowed = np.array(
        [
            [
                j <= i
                and segments_L[i] == segments_L[j]
                and (not cfg.sliding_window or i - j < cfg.sliding_window)
                for j in range(length)
            ]
            for i in range(length)
        ]
    )
    x = p["embed"]["embedding"][tokens_L]
    for layer in range(cfg.n_layers):
        w = jax.tree_util.tree_map(lambda a, layer=layer: a[layer], p["layers"])
        h = _rms_norm(x, w["ln_attn"]["scale"], cfg.layer_norm_eps)
        q = np.einsum("ld,dnh->lnh", h, w["attn"]["query"]["kernel"])
        k = np.einsum("ld,dnh->lnh", h, w["attn"]["key"]["kernel"])
        v = np.einsum("ld,dnh->lnh", h, w["attn"]["value"]["kernel"])
        q, k = _rope(q, positions_L, cfg.rope_base), _rope(k, positions_L, cfg.rope_base)
        # Grouped-query: each kv head serves n_heads // kv_heads consecutive query heads.
        k = np.repeat(k, n_heads // kv_heads, axis=1)
        v = np.repeat(v, n_heads // kv_heads, axis=1)
        attn = np.zeros_like(q)
        for n in range(n_heads):
            scores = q[:, n] @ k[:, n].T / np.sqrt(head_dim)
            scores = np.where(allowed, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attn[:, n] = (probs / probs.sum(axis=-1, keepdims=True)) @ v[:, n]
        x = x + np.einsum("lnh,nhd->ld", attn, w["attn"]["out"]["kernel"])
        h = _rms_norm(x, w["ln_mlp"]["scale"], cfg.layer_norm_eps)
        gate = _silu(h @ w["mlp"]["gate"]["kernel"])
        x = x + (gate * (h @ w["mlp"]["up"]["kernel"])) @ w["mlp"]["down"]["kernel"]
    x = _rms_norm(x, p["ln_final"]["scale"], cfg.layer_norm_eps)
    return x @ p["lm_head"]["kernel"]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_heads": 1, "sliding_window": 4}, {"n_kv_heads": 4}],
    ids=["gqa", "mqa-window4", "mha"],
)
def test_llama_matches_numpy_reference(overrides):
    cfg = dataclasses.replace(TINY_LLAMA, **overrides)
    model = build_model(cfg)
    params = nn.meta.unbox(
        jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 12), jnp.int32))["params"]
    )
    assert set(params["layers"]["mlp"]) == {"gate", "up", "down"}  # SwiGLU, no biases
    assert "bias" not in params["layers"]["attn"]["key"] and "pos_embed" not in params
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size))
    # Row 0 packs two documents: RoPE must rotate by per-document positions.
    segments = np.array([[1] * 5 + [2] * 7, [1] * 12])
    positions = np.array([list(range(5)) + list(range(7)), list(range(12))])
    logits = jax.jit(model.apply)({"params": params}, tokens, segments, positions)
    assert logits.dtype == jnp.float32
    for row in range(2):
        expected = reference_logits(cfg, params, tokens[row], segments[row], positions[row])
        np.testing.assert_allclose(logits[row], expected, rtol=1e-5, atol=1e-5)


def test_kv_projections_carry_their_own_logical_axis():
    """`kv_heads` lets a rules table shard (or replicate) the fewer kv heads on their own."""
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    boxed = jax.eval_shape(build_model(TINY_LLAMA).init, jax.random.PRNGKey(0), tokens)
    attn = boxed["params"]["layers"]["attn"]
    assert attn["key"]["kernel"].names == ("layers", "embed", "kv_heads", "head_dim")
    assert attn["key"]["kernel"].value.shape == (2, 32, 2, 8)
    assert attn["query"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
    assert attn["query"]["kernel"].value.shape == (2, 32, 4, 8)


def test_sliding_window_limits_what_a_layer_sees():
    """With one layer and window 4, position t depends on tokens t-3..t only."""
    cfg = dataclasses.replace(TINY_LLAMA, n_layers=1, sliding_window=4)
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))
    apply = jax.jit(model.apply)
    a = jax.random.randint(jax.random.PRNGKey(3), (1, 12), 0, cfg.vocab_size)
    b = a.at[:, 5].set((a[:, 5] + 1) % cfg.vocab_size)
    diff = np.abs(apply(params, a) - apply(params, b)).max(axis=-1)[0]
    assert np.all(diff[:5] < 1e-6) and np.all(diff[5:9] > 1e-4) and np.all(diff[9:] < 1e-6)


def test_bfloat16_compute_keeps_fp32_logits():
    cfg = dataclasses.replace(TINY_LLAMA, dtype="bfloat16")
    model = build_model(cfg)
    tokens = jnp.arange(12)[None] % cfg.vocab_size
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    logits = jax.jit(model.apply)(params, tokens)
    full = jax.jit(build_model(TINY_LLAMA).apply)(params, tokens)
    assert logits.dtype == jnp.float32
    assert jax.tree_util.tree_leaves(nn.meta.unbox(params))[0].dtype == jnp.float32
    np.testing.assert_allclose(logits, full, atol=0.05)


def test_family_fills_only_the_fields_left_empty():
    llama = load_config(None, ["model.family=llama"]).model
    assert (llama.norm, llama.mlp, llama.position) == ("rmsnorm", "swiglu", "rope")
    assert llama.use_bias is False and llama.tie_embeddings is False
    assert llama.ff_dim == 768  # 8/3 * 256, rounded up to a multiple of 256
    mixed = load_config(
        None, ["model.family=llama", "model.norm=layernorm", "model.tie_embeddings=true"]
    ).model
    assert mixed.norm == "layernorm" and mixed.tie_embeddings is True and mixed.mlp == "swiglu"
    gpt2 = load_config(None, []).model
    assert (gpt2.norm, gpt2.position, gpt2.use_bias, gpt2.ff_dim) == (
        "layernorm",
        "learned",
        True,
        1024,
    )
    assert ModelConfig(d_model=4096, family="llama").ff_dim == 11008  # Llama-2-7B's


@pytest.mark.parametrize(
    "override, key, message",
    [
        (
            "model.family=bart",
            "model.family",
            "unknown family 'bart'; known: gpt2, llama, t5, bert",
        ),
        ("model.n_kv_heads=3", "model.n_kv_heads", "n_heads 4 is not a multiple of n_kv_heads 3"),
        ("model.n_kv_heads=-1", "model.n_kv_heads", "must be >= 0"),
        ("model.norm=batchnorm", "model.norm", "must be layernorm or rmsnorm"),
        ("model.mlp=swish", "model.mlp", "must be gelu or swiglu or relu"),
        ("model.position=alibi", "model.position", "must be learned or rope"),
        ("model.rope_base=0.5", "model.rope_base", "must be > 1"),
        ("model.sliding_window=-2", "model.sliding_window", "must be >= 0"),
        ("model.n_heads=8", "model.n_heads", "RoPE needs an even head_dim"),
    ],
)
def test_bad_model_settings_name_the_key(override, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["model.family=llama", "model.d_model=24", override])
    assert err.value.key == key


def test_fields_mix_across_families():
    """Each part is its own switch: a GPT-2 with RoPE, RMSNorm and no biases, counted."""
    d, layers, vocab = 32, 2, 61
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, norm="rmsnorm", position="rope")
    per_layer = 4 * d * d + 2 * 4 * d * d + 2 * d  # attention, GELU MLP, two norm scales
    assert count_params(dataclasses.replace(cfg, use_bias=False)) == (
        vocab * d + layers * per_layer + d
    )
    biases = 3 * d + d + 4 * d + d  # q/k/v, out, fc_in, fc_out (RMSNorm has none)
    assert count_params(cfg) == vocab * d + layers * (per_layer + biases) + d
