"""Attention maps sown on request: rows are distributions, masks hold, and the maps are
the reference softmax of the layer's own q and k, for every family."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxlm.errors import JaxlmError
from jaxlm.model_config import ModelConfig
from jaxlm.models import build_model
from jaxlm.observe.attention_maps import collect_maps, pick

VOCAB = 64
GPT2 = ModelConfig(
    vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=16, scan_layers=False
)
TOKENS = np.arange(1, 9, dtype=np.int32)[None] * 3 % VOCAB
SEGMENTS = np.asarray([[1, 1, 1, 2, 2, 2, 2, 2]], np.int32)  # two packed documents


def _apply(config, *args, capture=False):
    """Params, output and intermediates; jitted, so each model compiles once."""
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *args)["params"]
    take = (lambda m, _: m.name in ("query", "key")) if capture else False

    @jax.jit
    def apply(params, *args):
        return model.apply(
            {"params": params}, *args, mutable=["intermediates"], capture_intermediates=take
        )

    out, state = apply(params, *args)
    return model, params, out, state["intermediates"]


def _softmax(scores):
    scores = scores - scores.max(-1, keepdims=True)
    return np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
def test_decoder_maps_are_the_reference(attention):
    config = dataclasses.replace(GPT2, attention=attention)
    model, params, logits, inter = _apply(config, TOKENS, SEGMENTS, capture=True)
    maps = collect_maps(inter)["attn"]
    assert maps.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    allowed = np.tril(np.ones((8, 8), bool)) & (SEGMENTS[0][:, None] == SEGMENTS[0][None])
    assert np.all(maps[:, :, ~allowed] == 0)  # no future token, no other document
    for layer in range(2):
        attn = inter[f"layers_{layer}"]["attn"]
        q = np.asarray(attn["query"]["__call__"][0][0], np.float64)  # (T, N, H)
        k = np.asarray(attn["key"]["__call__"][0][0], np.float64)
        scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(q.shape[-1])
        expected = _softmax(np.where(allowed, scores, -np.inf))
        np.testing.assert_allclose(maps[layer], expected, atol=1e-5)
    # The default path is untouched: same logits, nothing sown.
    plain = jax.jit(model.apply)({"params": params}, TOKENS, SEGMENTS)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))


def test_scanned_layers_give_one_map_per_layer():
    config = dataclasses.replace(GPT2, scan_layers=True, family="llama", n_kv_heads=2, d_ff=32)
    maps = collect_maps(_apply(config, TOKENS, SEGMENTS)[3])["attn"]
    assert maps.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(maps[..., np.triu_indices(8, 1)[0], np.triu_indices(8, 1)[1]] == 0)
    with pytest.raises(JaxlmError, match="--layer 2"):
        pick({"attn": maps}, None, 2, 0)
    with pytest.raises(JaxlmError, match="--head 4"):
        pick({"attn": maps}, None, 0, 4)


def test_bert_maps_are_bidirectional_and_skip_padding():
    config = ModelConfig(
        family="bert", vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=4, d_ff=32, max_len=24
    )
    padded = np.asarray([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)  # segment 0: padding
    maps = collect_maps(_apply(config, TOKENS, None, padded)[3])["encoder/attn"]
    assert maps.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(maps[:, :, :6, 6:] == 0) and np.all(maps[:, :, :6, :6] > 0)


def test_t5_maps_cover_self_and_cross_attention():
    config = ModelConfig(
        family="t5",
        vocab_size=VOCAB,
        d_model=16,
        n_layers=2,
        n_decoder_layers=1,
        n_heads=2,
        d_ff=24,
        relative_buckets=8,
        relative_max_distance=12,
    )
    target = TOKENS[:, :5]
    maps = collect_maps(_apply(config, TOKENS, target)[3])
    assert {k: v.shape for k, v in maps.items()} == {
        "encoder/self_attn": (2, 2, 8, 8),
        "decoder/self_attn": (1, 2, 5, 5),
        "decoder/cross_attn": (1, 2, 5, 8),
    }
    for m in maps.values():
        np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
    assert np.all(
        maps["decoder/self_attn"][..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0
    )
    assert np.all(maps["encoder/self_attn"] > 0)  # bidirectional
