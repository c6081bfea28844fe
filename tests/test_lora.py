"""LoRA: adapters on a decoder's projections train alone. The base weights stay bitwise
unchanged and carry no optimizer state; the trainable count is rank (d_in + d_out) per
targeted projection per layer; the merged weights, applied by the plain (rank-0) model,
give the adapted model's logits; wrong `lora.*` keys are one line, exit 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxlm import sharding as shd
from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.errors import ConfigError
from jaxlm.model_config import lora_param_count
from jaxlm.models import build_model
from jaxlm.models.lora import has_adapters, merge_lora
from jaxlm.train.objectives import for_family
from jaxlm.train.step import batch_shardings, train_steps

from .conftest import TINY


def _config(*overrides):
    return load_config(
        None,
        [*TINY, "model.n_layers=2", "model.vocab_size=512", "optim.warmup_steps=0", *overrides],
    )


def _formula(config) -> int:
    """sum over targeted projections of r (d_in + d_out), per layer, written out."""
    m, r = config.model, config.lora.rank
    d, f = m.d_model, m.ff_dim
    q, kv = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    dims = {"query": (d, q), "key": (d, kv), "value": (d, kv), "out": (q, d)}
    dims |= {"fc_in": (d, f), "fc_out": (f, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    return m.n_layers * sum(r * (dims[t][0] + dims[t][1]) for t in config.lora.targets)


def _adapter(path) -> bool:
    return "lora_" in jax.tree_util.keystr(path)


def _random_b(params, seed=1):
    """B is zeros at init (the adapted model starts as the base); give it values."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        if "lora_b" in jax.tree_util.keystr(path):
            return jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


@pytest.mark.parametrize(
    "family, targets",
    [("gpt2", "[query,key,value,out,fc_in,fc_out]"), ("llama", "[query,value,gate,up,down]")],
)
def test_trainable_count_and_merged_logits(family, targets):
    """llama with grouped kv heads (key/value narrower than query), gpt2 unscanned."""
    extra = ["model.n_kv_heads=2"] if family == "llama" else ["model.scan_layers=false"]
    config = _config(f"model.family={family}", "lora.rank=4", f"lora.targets={targets}", *extra)
    model = build_model(config.model, lora=config.lora)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    n_adapters = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params) if _adapter(p))
    assert n_adapters == _formula(config) == lora_param_count(config.model, config.lora)

    # Rank 0: the plain model's tree; the adapted one adds exactly lora_a / lora_b.
    plain = build_model(config.model)
    plain_params = jax.eval_shape(plain.init, jax.random.PRNGKey(0), tokens)["params"]
    base = jax.tree_util.tree_map(
        lambda x: x.shape, nn.meta.unbox(plain_params), is_leaf=lambda x: hasattr(x, "shape")
    )
    merged = merge_lora(_random_b(params), config.lora)
    assert not has_adapters(merged)
    assert jax.tree_util.tree_map(lambda x: x.shape, merged) == base

    # The merged weights in the plain model == the adapted model (B non-zero).
    adapted = model.apply({"params": _random_b(params)}, tokens)
    unadapted = plain.apply({"params": merge_lora(params, config.lora)}, tokens)
    folded = plain.apply({"params": merged}, tokens)
    np.testing.assert_allclose(folded, adapted, atol=1e-5)
    assert float(jnp.abs(adapted - unadapted).max()) > 1e-3  # the adapters do something


def test_training_moves_only_the_adapters_and_only_they_have_optimizer_state():
    """gpt2 on data=4 x fsdp=2, three steps: every base param bitwise as before, every
    adapter changed; Adam's moments are adapter-sized (2 x the trainable count)."""
    config = _config("mesh.data=4", "mesh.fsdp=2", "lora.rank=4", "lora.alpha=8")
    mesh = shd.make_mesh(config.mesh)
    rules = shd.logical_rules(config.mesh)
    _, abstract, shardings, _, (step, _) = train_steps(config, mesh, rules)
    rng = np.random.default_rng(0)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(x.shape, x.dtype)
        if "lora_b" in name:
            return np.zeros(x.shape, x.dtype)
        return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

    zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    init = zeros.replace(
        params=jax.tree_util.tree_map_with_path(leaf, abstract.params),
        rng=np.asarray(jax.random.PRNGKey(0)),
    )
    # The optimizer state: only adapter-sized arrays (plus scalar step counts).
    arrays = [x for x in jax.tree_util.tree_leaves(abstract.opt_state) if x.ndim > 0]
    trainable = _formula(config)
    assert trainable == 2 * 2 * 4 * (64 + 64)  # layers x (query, value) x r (d_in + d_out)
    assert sum(x.size for x in arrays) == 2 * trainable  # Adam's mu and nu
    adapter_shapes = sorted(
        x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract.params) if _adapter(p)
    )
    assert sorted(x.shape for x in arrays) == sorted(adapter_shapes * 2)

    objective = for_family("gpt2")
    batch = {}
    for key, shape in objective.batch_shapes(config.train.batch_size, config.train.seq_len).items():
        if key == "positions":
            batch[key] = np.broadcast_to(np.arange(shape[-1]), shape)
        elif key in ("inputs", "targets"):
            batch[key] = rng.integers(4, 512, shape)
        else:  # segment ids: one document per row
            batch[key] = np.ones(shape)
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    batch = jax.device_put(batch, batch_shardings(mesh, rules, objective.batch_ranks))
    state = jax.device_put(init, shardings)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    before = jax.tree_util.tree_leaves_with_path(init.params)
    after = jax.tree_util.tree_leaves(jax.device_get(state.params))
    for (path, old), new in zip(before, after, strict=True):
        if _adapter(path):
            assert not np.array_equal(old, new), jax.tree_util.keystr(path)
        else:
            assert np.array_equal(old, new), jax.tree_util.keystr(path)
            assert old.tobytes() == np.asarray(new).tobytes()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["lora.rank=4", "lora.targets=[query,q_proj]"],
            "config key 'lora.targets': unknown projection 'q_proj' for gpt2; valid: query, "
            "key, value, out, fc_in, fc_out",
        ),
        (
            ["model.family=llama", "lora.rank=4", "lora.targets=[fc_in]"],
            "config key 'lora.targets': unknown projection 'fc_in' for llama; valid: query, "
            "key, value, out, gate, up, down",
        ),
        (
            ["lora.rank=65", "lora.targets=[query,fc_in]"],
            "config key 'lora.rank': 65 exceeds 64, the smaller dimension of projection 'query'",
        ),
    ],
)
def test_bad_lora_keys_are_one_line_exit_2(overrides, message, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        _config(*overrides)
    assert str(err.value) == message
    assert main(["train", *TINY, *overrides, "--run-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"jaxlm: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_init_from_fills_the_base_and_keeps_the_fresh_adapters(tmp_path):
    """Fine-tuning a saved plain model with LoRA: the checkpoint has no adapters; its
    weights replace the base, the adapters keep their init (B = 0: the run starts as
    the checkpoint's function)."""
    from jaxlm.model_dir import save_pretrained
    from jaxlm.train.init_from import load_init_params

    tokens = jnp.zeros((1, 8), jnp.int32)
    plain = _config()
    saved = nn.meta.unbox(build_model(plain.model).init(jax.random.PRNGKey(1), tokens)["params"])
    save_pretrained(tmp_path / "base", plain, saved)

    config = _config("lora.rank=4", f"init_from={tmp_path / 'base'}")
    model = build_model(config.model, lora=config.lora)
    fresh = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    loaded = load_init_params(config, fresh)
    want = dict(jax.tree_util.tree_leaves_with_path(saved))
    n_adapters = 0
    for path, x in jax.tree_util.tree_leaves_with_path(loaded):
        if _adapter(path):
            n_adapters += 1
            got = dict(jax.tree_util.tree_leaves_with_path(fresh))[path]
            np.testing.assert_array_equal(x, got)
        else:
            np.testing.assert_array_equal(x, want[path])
    assert n_adapters == 2 * len(config.lora.targets)  # A and B per target (scanned)
