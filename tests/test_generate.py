"""KV-cache decoding against recomputing the whole sequence, and the sampling rules.

The reference for every step is one teacher-forced forward pass over prompt + the
generated tokens (causal, so position t sees exactly what step t saw): greedy decoding
must pick its argmax and return its logits within 1e-5 (fp32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxlm.errors import JaxlmError
from jaxlm.generation import generate_ids, next_token, nucleus_mask, top_p_filter
from jaxlm.generation.programs import program
from jaxlm.generation.sampling import greedy_token
from jaxlm.model_config import ModelConfig
from jaxlm.models import build_model

TIGHT = dict(rtol=1e-5, atol=1e-5)
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 9, 3, 4, 60]]
NEW = 7
CONFIGS = {
    "gpt2": dict(family="gpt2", scan_layers=False),  # learned positions, tied head
    "llama-gqa-window-scan": dict(family="llama", n_kv_heads=2, sliding_window=6),  # RoPE
    "t5": dict(family="t5", n_decoder_layers=2),
}


def _model(name: str):
    """A tiny model with large random weights, so greedy tokens vary from step to step."""
    config = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_len=64)
    config = ModelConfig(**{**config.__dict__, **CONFIGS[name]}).resolved()
    model = build_model(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(shapes["params"]))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return model, jax.tree_util.tree_unflatten(tree, params)


@functools.cache
def _greedy(name: str):
    """(model, params, greedy generation with logits), computed once per module run."""
    model, params = _model(name)
    greedy = generate_ids(model, params, PROMPTS, max_new_tokens=NEW, return_logits=True)
    return model, params, greedy


def _full_logits(name, model, params, tokens):
    """Logits of every generated token of every row, from one pass over the whole
    sequences (right-padded, which a causal model never looks at)."""
    width = max(map(len, PROMPTS)) + NEW
    if name == "t5":
        src = np.zeros((len(PROMPTS), width), np.int32)
        for i, p in enumerate(PROMPTS):
            src[i, : len(p)] = p
        tgt = jnp.asarray([[0, *t[:-1]] for t in tokens])
        logits = model.apply({"params": params}, jnp.asarray(src), tgt, jnp.asarray(src > 0))
        return [np.asarray(x) for x in logits]
    seq = np.zeros((len(PROMPTS), width), np.int32)
    for i, (p, t) in enumerate(zip(PROMPTS, tokens, strict=True)):
        seq[i, : len(p) + len(t) - 1] = [*p, *t[:-1]]
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(seq)))
    return [logits[i, len(p) - 1 : len(p) - 1 + NEW] for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_matches_full_recompute(name):
    model, params, greedy = _greedy(name)
    assert [len(t) for t in greedy.tokens] == [NEW] * len(PROMPTS)
    full = _full_logits(name, model, params, greedy.tokens)
    for tokens, logits, expected in zip(greedy.tokens, greedy.logits, full, strict=True):
        np.testing.assert_allclose(logits, expected, **TIGHT)
        assert tokens == expected.argmax(-1).tolist()
    assert len({t for row in greedy.tokens for t in row}) > 1, "weights too tame to test"


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model, params, greedy = _greedy("gpt2")  # the sampling code is shared by every model

    def sample(**kw):
        return generate_ids(model, params, PROMPTS, max_new_tokens=NEW, **kw).tokens

    first = sample(temperature=1.5, seed=3)
    assert sample(temperature=1.5, seed=3) == first
    assert sample(temperature=1.5, seed=4) != first
    assert sample(temperature=1.5, top_k=1, seed=5) == greedy.tokens


def test_eos_and_stop_sequences_end_rows_like_hugging_face():
    model, params, greedy = _greedy("gpt2")  # the loop is shared by every model
    rows = greedy.tokens
    eos = rows[0][3]

    def upto(row, n):  # first n tokens, ending at the first EOS, which is kept
        row = row[:n]
        return row[: row.index(eos) + 1] if eos in row else row

    out = generate_ids(model, params, PROMPTS, max_new_tokens=NEW, eos_id=eos).tokens
    assert out == [upto(r, NEW) for r in rows]
    assert out[0][-1] == eos and len(out[0]) <= 4

    stop = rows[1][2:4]

    def ends(row):  # the first n at which row[:n] ends with the stop sequence
        hits = [n for n in range(2, len(row) + 1) if row[n - 2 : n] == stop]
        return row[: hits[0]] if hits else row

    out = generate_ids(model, params, PROMPTS, max_new_tokens=NEW, stop=[stop, [96, 96, 96]])
    assert out.tokens == [ends(r) for r in rows]
    assert out.tokens[1][-2:] == stop
    short = generate_ids(model, params, PROMPTS, max_new_tokens=3).tokens
    assert short == [r[:3] for r in rows]


def test_one_compile_per_bucket():
    model, params, _ = _greedy("gpt2")
    before = program._cache_size()
    generate_ids(model, params, [[1, 2, 3]], max_new_tokens=5)
    generate_ids(model, params, [[4, 5, 6, 7, 8]], max_new_tokens=8)  # same buckets
    assert program._cache_size() == before + 1


def test_greedy_token_is_argmax_with_lowest_id_on_ties():
    logits = np.random.default_rng(0).standard_normal((5, 300)).astype(np.float32)
    logits[1, [7, 40, 299]] = 9.0  # a three-way tie: the lowest id wins
    logits[2, :] = 0.0
    logits[3, 50] = np.nan  # still a valid id
    got = np.asarray(greedy_token(jnp.asarray(logits)))
    assert got[[0, 1, 2, 4]].tolist() == logits[[0, 1, 2, 4]].argmax(-1).tolist()
    assert got[1] == 7 and got[2] == 0 and 0 <= got[3] < 300


def test_nucleus_is_the_smallest_set_reaching_top_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = jnp.log(jnp.asarray([probs]))
    for p, kept in [
        (0.3, {1}),
        (0.7, {1, 3}),
        (0.8, {1, 3}),
        (0.9, {1, 2, 3}),
        (0.97, {0, 1, 2, 3}),
    ]:
        filtered = np.asarray(top_p_filter(logits, p))[0]
        assert set(np.flatnonzero(np.isfinite(filtered))) == kept, p
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    assert np.asarray(nucleus_mask(sorted_logits, 0.85))[0].tolist() == [True, True, True, False]
    # Drawn tokens come from the nucleus only, in proportion to their renormalised mass.
    rows = jnp.repeat(logits, 3000, axis=0)
    for top_k in (0, 3):
        drawn = np.asarray(next_token(rows, jax.random.PRNGKey(0), (False, top_k, True), 1.0, 0.7))
        counts = np.bincount(drawn, minlength=4) / len(drawn)
        np.testing.assert_allclose(counts, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.03)


def test_bad_requests_are_one_clear_error():
    model, params, _ = _greedy("gpt2")
    with pytest.raises(JaxlmError, match="at least one prompt token"):
        generate_ids(model, params, [[1], []])
    with pytest.raises(JaxlmError, match="outside the vocabulary"):
        generate_ids(model, params, [[1, 500]])
    with pytest.raises(JaxlmError, match="learned positions"):
        generate_ids(model, params, [[1] * 60], max_new_tokens=10)
    with pytest.raises(JaxlmError, match="top_p"):
        generate_ids(model, params, [[1]], temperature=1.0, top_p=0.0)
