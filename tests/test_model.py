import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxlm.config import ModelConfig
from jaxlm.models import build_model
from jaxlm.models.attention import attention_bias, einsum_attention

VOCAB = 97
GPT2 = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=32)
# RMSNorm, SwiGLU, RoPE, 2 kv heads for 4 query heads, no biases, untied output.
LLAMA = dataclasses.replace(GPT2, family="llama", n_kv_heads=2, d_ff=64)


@pytest.fixture(scope="module", params=[GPT2, LLAMA], ids=["gpt2", "llama"])
def model_and_params(request):
    cfg = request.param
    model = build_model(cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    return cfg, jax.jit(model.apply), nn.meta.unbox(variables)["params"], variables["params"]


def _tokens(seed, shape=(2, 16)):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 4, VOCAB)


def test_every_param_has_logical_axes(model_and_params):
    _, _, _, boxed = model_and_params
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and all(leaf.names)


@pytest.mark.parametrize(
    "n_heads, kv_heads, window",
    [(3, 3, 0), (4, 2, 0), (4, 1, 3)],
    ids=["multi-head", "grouped-query", "multi-query-window3"],
)
def test_attention_matches_numpy_reference(n_heads, kv_heads, window):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 6, n_heads, 4)).astype(np.float32)
    k, v = (rng.standard_normal((2, 6, kv_heads, 4)).astype(np.float32) for _ in range(2))
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    out = einsum_attention(q, k, v, attention_bias(jnp.asarray(seg), window=window))
    expected = np.zeros_like(q)
    group = n_heads // kv_heads
    for b in range(2):
        for n in range(n_heads):
            for i in range(6):
                keys = [
                    j
                    for j in range(i + 1)
                    if seg[b, j] == seg[b, i] and (not window or i - j < window)
                ]
                s = q[b, i, n] @ k[b, keys, n // group].T / 2.0
                p = np.exp(s - s.max())
                expected[b, i, n] = (p / p.sum()) @ v[b, keys, n // group]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_causal(model_and_params):
    _, apply, params, _ = model_and_params
    a = _tokens(1)
    b = a.at[:, 9:].set(_tokens(2)[:, 9:])
    la, lb = apply({"params": params}, a), apply({"params": params}, b)
    np.testing.assert_allclose(la[:, :9], lb[:, :9], atol=1e-6)
    assert np.abs(la[:, 9:] - lb[:, 9:]).max() > 1e-3


def test_packed_documents_do_not_see_each_other(model_and_params):
    """Doc B packed after doc A gives the same logits as B alone; changing A doesn't matter."""
    _, apply, params, _ = model_and_params
    doc_a, doc_b = _tokens(3, (1, 7)), _tokens(4, (1, 9))
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    seg = jnp.asarray([[1] * 7 + [2] * 9])
    pos = jnp.asarray([list(range(7)) + list(range(9))])
    out = apply({"params": params}, packed, seg, pos)
    alone = apply({"params": params}, doc_b)
    np.testing.assert_allclose(out[:, 7:], alone, atol=1e-5)
    other_a = jnp.concatenate([_tokens(5, (1, 7)), doc_b], axis=1)
    out2 = apply({"params": params}, other_a, seg, pos)
    np.testing.assert_allclose(out2[:, 7:], out[:, 7:], atol=1e-6)
    # Without segment ids the same row does leak: the check above can fail.
    leaky = apply({"params": params}, packed, None, pos)
    assert np.abs(leaky[:, 7:] - alone).max() > 1e-3


def test_scanned_and_unrolled_stacks_agree(model_and_params):
    cfg, apply, params, _ = model_and_params
    unrolled = build_model(dataclasses.replace(cfg, scan_layers=False))
    per_layer = {k: v for k, v in params.items() if k != "layers"} | {
        f"layers_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
        for i in range(cfg.n_layers)
    }
    tokens = _tokens(6)
    np.testing.assert_allclose(
        apply({"params": params}, tokens),
        jax.jit(unrolled.apply)({"params": per_layer}, tokens),
        rtol=1e-5,
        atol=1e-5,
    )


def test_remat_keeps_gradients(model_and_params):
    cfg, _, params, _ = model_and_params
    tokens = _tokens(7)

    def grads(cfg):
        model = build_model(cfg)
        return jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).mean()))(params)

    base = grads(cfg)
    for policy, offload in (
        ("full", ""),
        ("dots", ""),
        ("minimal", ""),
        ("qkv_with_context", ""),
        ("save:mlpwi+context", ""),
        ("save_qkv_proj", "context+mlpwi"),
    ):
        jax.tree_util.tree_map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
            base,
            grads(dataclasses.replace(cfg, remat=policy, remat_offload=offload)),
        )


def test_remat_offload_keeps_the_named_activations_in_host_memory(model_and_params, capsys):
    """`remat_offload`'s activations are residuals in host memory (JAX marks their type
    `<host>`), one per layer and name; the kept names stay on the device."""
    cfg = dataclasses.replace(
        model_and_params[0], remat="save:key_proj", remat_offload="out_proj", scan_layers=False
    )
    model = build_model(cfg)
    tokens = _tokens(8)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens))["params"]
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: model.apply({"params": p}, tokens).mean(), params
    )
    out = capsys.readouterr().out
    assert set(re.findall(r"named '(\w+)'", out)) == {"key_proj"}
    assert len(re.findall(r"<host>\[", out)) == cfg.n_layers


@pytest.mark.parametrize(
    "policy, saved",
    [
        ("full", set()),
        ("minimal", {"query_proj", "key_proj", "value_proj", "out_proj", "mlpwi"}),
        (
            "minimal_with_context",
            {"query_proj", "key_proj", "value_proj", "out_proj", "mlpwi", "context"},
        ),
        ("qkv_with_context", {"query_proj", "key_proj", "value_proj", "context"}),
        ("save:key_proj+context", {"key_proj", "context"}),
    ],
)
def test_remat_policies_save_the_named_activations(model_and_params, policy, saved, capsys):
    """What the backward keeps, read from JAX's own residual list: the named
    projections (and attention's output with context), nothing named under full.
    (`mlpwo`, the MLP's output, only joins the residual sum: no backward needs it.)"""
    model = build_model(dataclasses.replace(model_and_params[0], remat=policy, scan_layers=False))
    tokens = _tokens(8)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens))["params"]
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: model.apply({"params": p}, tokens).mean(), params
    )
    names = set(re.findall(r"named '(\w+)'", capsys.readouterr().out))
    assert names == saved
