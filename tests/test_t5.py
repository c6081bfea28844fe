"""The T5 encoder-decoder: published size, masks, a NumPy reference, the seq2seq
loss, and training from the CLI."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxlm.cli
import jaxlm.train.loop
from jaxlm.config import ModelConfig, load_config
from jaxlm.errors import ConfigError
from jaxlm.info import model_info
from jaxlm.models import T5, build_model
from jaxlm.models.encdec import relative_position_bucket
from jaxlm.train import objectives
from jaxlm.train.metrics import read_metrics

from .conftest import REPO
from .test_train_families import jaxlm as run_cli

CONFIGS = REPO / "configs"
VOCAB = 61
TINY = ModelConfig(
    family="t5",
    vocab_size=VOCAB,
    d_model=16,
    n_layers=2,
    n_decoder_layers=2,
    n_heads=2,
    d_ff=24,
    layer_norm_eps=1e-6,
    relative_buckets=8,
    relative_max_distance=12,
)


def test_t5_small_has_the_published_parameter_count():
    info = model_info(load_config(CONFIGS / "t5-small.yaml"))
    # 32128 x 512 shared embedding + 6 encoder and 6 decoder layers + one 32 x 8 table per stack
    assert info.n_params == 60_506_624
    assert info.groups == {"decoder": 25_175_808, "embed": 16_449_536, "encoder": 18_881_280}
    m = info.model
    assert (m.norm, m.mlp, m.position, m.use_bias, m.tie_embeddings) == (
        "rmsnorm",
        "relu",
        "relative",
        False,
        True,
    )


def test_jaxlm_info_on_t5_small(capsys):
    assert jaxlm.cli.main(["info", str(CONFIGS / "t5-small.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("t5-small: t5 encoder-decoder: 6+6 layers, d_model 512, 8 heads")
    assert "relative bias (32 buckets, max distance 128)" in out[0]
    assert out[1] == "parameters:             60,506,624  (60.51M)"


def test_t5_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.position"):
        load_config(CONFIGS / "t5-tiny.yaml", ["model.position=rope"])
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(CONFIGS / "t5-tiny.yaml", ["model.attention=flash"])
    with pytest.raises(ConfigError, match="model.relative_max_distance"):
        load_config(CONFIGS / "t5-tiny.yaml", ["model.relative_max_distance=8"])


@pytest.fixture(scope="module")
def t5():
    model = build_model(TINY)
    assert isinstance(model, T5)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    # Random norm scales and relative biases too, so the reference checks every parameter.
    leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(variables)["params"])
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree,
        [
            x + 0.3 * jax.random.normal(k, x.shape) if x.ndim == 1 else x
            for x, k in zip(leaves, keys, strict=True)
        ],
    )
    return model, params, variables["params"]


def _tokens(seed, shape):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 1, VOCAB)


def test_every_param_has_logical_axes(t5):
    _, _, boxed = t5
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    names = set()
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and all(leaf.names)
        names.update(leaf.names)
    assert names == {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "relpos_buckets"}
    # One relative-bias table per stack, in its first layer.
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
    tables = [jax.tree_util.keystr(p) for p, _ in flat if "relpos" in jax.tree_util.keystr(p)]
    assert tables == [
        "['decoder']['layers_0']['relpos']['embedding']",
        "['encoder']['layers_0']['relpos']['embedding']",
    ]


def test_decoder_is_causal_and_encoder_bidirectional(t5):
    model, params, _ = t5
    v = {"params": params}
    src, tgt = _tokens(1, (2, 7)), _tokens(2, (2, 6))
    logits = model.apply(v, src, tgt)
    later = tgt.at[:, 4:].set(_tokens(3, (2, 2)))
    changed = model.apply(v, src, later)
    np.testing.assert_allclose(logits[:, :4], changed[:, :4], atol=1e-6)
    assert np.abs(logits[:, 4:] - changed[:, 4:]).max() > 1e-3
    enc = model.apply(v, src, method=T5.encode)
    enc_later = model.apply(v, src.at[:, 5:].set(_tokens(4, (2, 2))), method=T5.encode)
    assert np.abs(enc[:, :5] - enc_later[:, :5]).max() > 1e-3  # earlier positions see later ones


def test_cross_attention_sees_the_source_but_not_its_padding(t5):
    model, params, _ = t5
    v = {"params": params}
    src, tgt = _tokens(5, (2, 7)), _tokens(6, (2, 6))
    src_mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])
    logits = model.apply(v, src, tgt, src_mask)
    other = model.apply(v, src.at[:, 2].set((src[:, 2] + 1) % VOCAB), tgt, src_mask)
    assert np.abs(logits - other).min(axis=-1).max() > 1e-4  # every example's output moves
    padded = src.at[1, 4:].set(_tokens(7, (3,)))
    same = model.apply(v, padded, tgt, src_mask)
    np.testing.assert_allclose(logits[1], same[1], atol=1e-6)
    # encode + decode is __call__, and a one-argument init/apply decodes the source itself.
    enc = model.apply(v, src, src_mask, method=T5.encode)
    parts = model.apply(v, tgt, enc, src_mask, method=T5.decode)
    np.testing.assert_allclose(parts, logits, atol=1e-6)
    assert logits.dtype == jnp.float32 and model.apply(v, src).shape == (2, 7, VOCAB)


def _bucket_np(relative: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Mesh TensorFlow's `_relative_position_bucket`, one distance at a time."""
    ret, n = 0, -relative
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(large, num_buckets - 1)


def test_relative_position_bucket_matches_t5():
    rel = np.arange(-300, 301)
    for bidirectional in (True, False):
        got = relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128)
        want = [_bucket_np(int(r), bidirectional, 32, 128) for r in rel]
        np.testing.assert_array_equal(got, want)
    # Known values of T5's bidirectional buckets: key 1 after, 1 before, far before/after.
    got = relative_position_bucket(jnp.asarray([0, 1, -1, -200, 200]), True, 32, 128)
    np.testing.assert_array_equal(got, [0, 17, 1, 15, 31])


def _numpy_t5(p, src, tgt, src_mask, c: ModelConfig):
    """A plain NumPy T5 forward: float64, loops over layers, T5's equations as published."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), p)
    emb = p["embed"]["embedding"]

    def rms(x, scale):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + c.layer_norm_eps) * scale

    def attend(a, x, kv, bias):  # bias: (B, N, Lq, Lk)
        q = np.einsum("bld,dnh->bnlh", x, a["query"]["kernel"])
        k = np.einsum("bld,dnh->bnlh", kv, a["key"]["kernel"])
        v = np.einsum("bld,dnh->bnlh", kv, a["value"]["kernel"])
        s = np.einsum("bnqh,bnkh->bnqk", q, k) + bias  # no 1/sqrt(head_dim)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        return np.einsum("bnqk,bnkh,nhd->bqd", w, v, a["out"]["kernel"])

    def relbias(table, length, bidirectional):
        b = [
            [_bucket_np(j - i, bidirectional, c.relative_buckets, c.relative_max_distance)]
            for i in range(length)
            for j in range(length)
        ]
        return table[np.asarray(b)[:, 0]].reshape(length, length, -1).transpose(2, 0, 1)[None]

    def stack(sp, x, self_mask, bidirectional, enc=None, cross_mask=None):
        n_layers = len([k for k in sp if k.startswith("layers_")])
        table = sp["layers_0"]["relpos"]["embedding"]
        bias = np.where(self_mask, relbias(table, x.shape[1], bidirectional), -1e30)
        for i in range(n_layers):
            lp = sp[f"layers_{i}"]
            h = rms(x, lp["ln_self_attn"]["scale"])
            x = x + attend(lp["self_attn"], h, h, bias)
            if enc is not None:
                h = rms(x, lp["ln_cross_attn"]["scale"])
                x = x + attend(lp["cross_attn"], h, enc, np.where(cross_mask, 0.0, -1e30))
            h = rms(x, lp["ln_mlp"]["scale"])
            ff = np.maximum(h @ lp["mlp"]["fc_in"]["kernel"], 0.0)
            x = x + ff @ lp["mlp"]["fc_out"]["kernel"]
        return rms(x, sp["ln_final"]["scale"])

    keep = src_mask.astype(bool)[:, None, None, :]
    enc = stack(p["encoder"], emb[src], keep, True)
    lt = tgt.shape[1]
    causal = np.tril(np.ones((lt, lt), bool))[None, None]
    dec = stack(p["decoder"], emb[tgt], causal, False, enc, keep)
    return (dec * c.d_model**-0.5) @ emb.T


def test_matches_numpy_reference(t5):
    model, params, _ = t5
    src, tgt = np.asarray(_tokens(8, (2, 9))), np.asarray(_tokens(9, (2, 7)))
    src_mask = np.asarray([[1] * 9, [1] * 5 + [0] * 4])
    got = model.apply({"params": params}, src, tgt, src_mask)
    want = _numpy_t5(params, src, tgt, src_mask, TINY.resolved())
    # The source is longer than the exact-bucket range, so log buckets are exercised too.
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_seq2seq_loss_matches_numpy(t5):
    model, params, _ = t5
    src, tgt_in, tgt = (np.asarray(_tokens(i, (2, n))) for i, n in ((10, 9), (11, 7), (12, 7)))
    src_mask = np.asarray([[1] * 9, [1] * 6 + [0] * 3])
    tgt_mask = np.asarray([[1] * 7, [1] * 4 + [0] * 3])
    batch = {
        "inputs": src,
        "input_mask": src_mask,
        "decoder_inputs": tgt_in,
        "targets": tgt,
        "target_mask": tgt_mask,
    }
    loss, n_tokens, sums = jax.jit(lambda p, b: objectives.seq2seq_loss(model, p, b))(params, batch)
    apply = jax.jit(model.apply)
    logits = np.asarray(apply({"params": params}, src, tgt_in, src_mask, tgt_mask), float)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_p, tgt[..., None], -1)[..., 0]
    real = tgt_mask == 1
    assert n_tokens == 11 and sums["tokens"] == 11
    np.testing.assert_allclose(loss, ce[real].mean(), rtol=1e-5)
    np.testing.assert_allclose(sums["loss_sum"], ce[real].sum(), rtol=1e-5)


T5_STEPS = 100
T5_LOSS_THRESHOLD = 5.3  # about 7 after 10 steps (T5 embeddings start large); measured 4.85


def test_jaxlm_train_t5_learns_to_translate(tmp_path):
    """t5-tiny from the CLI on the bundled en->de pairs: the target cross-entropy falls
    from about 7 to below the threshold."""
    run_dir = tmp_path / "run"
    out = run_cli("train", "configs/t5-tiny.yaml", "--run-dir", str(run_dir), "--no-progress")
    assert out.returncode == 0, out.stderr
    records = read_metrics(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert last["step"] == T5_STEPS
    assert last["eval_loss"] < T5_LOSS_THRESHOLD < first["loss"], (first, last)
    assert f"eval loss {last['eval_loss']:.4f}" in out.stdout
    assert "--- sample ---" not in out.stdout
