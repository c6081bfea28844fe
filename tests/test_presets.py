"""Presets: published parameter counts and `jaxlm info` (llama-tiny learning from the CLI is
in test_train_families.py)."""

import pytest

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.info import model_info
from jaxlm.model_config import flops_per_token

from .conftest import REPO

CONFIGS = REPO / "configs"

# Published counts; counted from `jax.eval_shape` of init, so 70B costs no memory.
PARAMS = {
    "gpt2-small": 124_439_808,  # Hugging Face gpt2
    "gpt2-medium": 354_823_168,  # Hugging Face gpt2-medium
    "llama-125m": 134_105_856,  # GPT-3 Small's shape with SwiGLU (no published checkpoint)
    "llama-1b": 1_100_048_384,  # TinyLlama-1.1B
    "llama-7b": 6_738_415_616,  # Llama-2-7B
    "llama-70b": 68_976_648_192,  # Llama-2-70B
    "gpt2-tiny": 940_800,  # with the 1024-piece tokenizer it trains
    "llama-tiny": 1_000_576,
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_preset_parameter_counts(name):
    info = model_info(load_config(CONFIGS / f"{name}.yaml"))
    assert info.n_params == PARAMS[name]


def test_llama_7b_preset_is_llama_2_7b():
    m = load_config(CONFIGS / "llama-7b.yaml").model
    assert (m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.ff_dim) == (4096, 32, 32, 32, 11008)
    assert (m.vocab_size, m.max_len, m.layer_norm_eps, m.rope_base) == (32000, 4096, 1e-5, 1e4)
    assert (m.norm, m.mlp, m.position, m.use_bias, m.tie_embeddings) == (
        "rmsnorm",
        "swiglu",
        "rope",
        False,
        False,
    )
    # 6 N without the input embedding (a lookup when untied) + 12 L d T for attention.
    expected = 6 * (6_738_415_616 - 32000 * 4096) + 12 * 32 * 4096 * 4096
    assert flops_per_token(m, 6_738_415_616, 4096) == expected == 46_086_512_640


def test_flops_of_a_sliding_window_count_only_the_window():
    m = load_config(CONFIGS / "llama-7b.yaml", ["model.sliding_window=1024"]).model
    assert flops_per_token(m, 6_738_415_616, 4096) == 6 * (6_738_415_616 - 32000 * 4096) + (
        12 * 32 * 4096 * 1024
    )


def test_jaxlm_info_on_gpt2_small(capsys):
    assert main(["info", str(CONFIGS / "gpt2-small.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gpt2-small: gpt2 decoder: 12 layers, d_model 768, 12 heads of 64")
    assert out[1] == "parameters:            124,439,808  (124.44M)"
    assert "  pos_embed:               786,432" in out
    # 6 (N - position table) + 12 L d T = 6 * 123,653,376 + 12 * 12 * 768 * 1024
    assert "training FLOPs per token: 855,166,464 (855.17M) at seq_len 1024" in out


def test_jaxlm_info_takes_overrides_and_names_bad_keys(capsys):
    assert main(["info", str(CONFIGS / "llama-70b.yaml"), "model.n_layers=2"]) == 0
    assert "parameters:          2,235,604,992" in capsys.readouterr().out
    assert main(["info", str(CONFIGS / "llama-70b.yaml"), "model.n_kv_heads=7"]) == 2
    assert "config key 'model.n_kv_heads'" in capsys.readouterr().err


def test_jaxlm_info_counts_each_kind_of_part_and_the_state_memory(capsys):
    """GPT-2 small's parts by the formulas of its shapes: d 768, 12 layers, vocab 50257
    (tied head, so no head parameters), 1024 positions."""
    d, layers, vocab, positions = 768, 12, 50257, 1024
    attention = layers * (4 * d * d + 4 * d)
    mlp = layers * (2 * 4 * d * d + 4 * d + d)
    norms = (2 * layers + 1) * 2 * d
    embeddings = vocab * d + positions * d
    assert main(["info", str(CONFIGS / "gpt2-small.yaml")]) == 0
    out = capsys.readouterr().out
    for kind, n in [("attention", attention), ("mlp", mlp), ("norms", norms)]:
        assert f"  {kind + ':':<15}{n:>17,}" in out
    assert f"  {'embeddings:':<15}{embeddings:>17,}" in out
    assert attention + mlp + norms + embeddings == 124_439_808
    assert "AdamW state:                  0.93 GiB (two moments, float32)" in out
