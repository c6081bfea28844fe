"""GPT-2 (`GPT2LMHeadModel`) <-> jaxlm's `Decoder` with the gpt2 family's parts.

HF GPT-2 uses `Conv1D`, which stores weights (in, out) like our kernels, and fuses
query, key and value into `c_attn` (D, 3D); its GELU is the tanh approximation
(`gelu_new`), which is `jax.nn.gelu`'s default.
"""

from __future__ import annotations

from typing import Any

from jaxlm.hf.hf_config import require
from jaxlm.hf.links import Link
from jaxlm.model_config import ModelConfig

MODEL_TYPE = "gpt2"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    require(hf, "activation_function", activation in TANH_GELUS, " or ".join(TANH_GELUS))
    require(hf, "scale_attn_weights", hf.get("scale_attn_weights", True), "true")
    inverse_layer_scale = hf.get("scale_attn_by_inverse_layer_idx", False)
    require(hf, "scale_attn_by_inverse_layer_idx", not inverse_layer_scale, "false")
    require(hf, "add_cross_attention", not hf.get("add_cross_attention", False), "false")
    d_model = hf["n_embd"]
    return ModelConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_len=hf["n_positions"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        norm="layernorm",
        mlp="gelu",
        position="learned",
        use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def fits(m: ModelConfig) -> bool:
    """Whether a jaxlm model is exactly a GPT-2."""
    return (m.norm, m.mlp, m.position, m.use_bias) == ("layernorm", "gelu", "learned", True) and (
        m.kv_heads == m.n_heads and m.sliding_window == 0
    )


def config_to_hf(m: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size,
        "n_embd": m.d_model,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": m.ff_dim,
        "n_positions": m.max_len,
        "layer_norm_epsilon": m.layer_norm_eps,
        "activation_function": "gelu_new",
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": bool(m.tie_embeddings),
    }


def rename(name: str) -> str:
    """`GPT2Model` files (the hub's `gpt2`) have no `transformer.` prefix."""
    if name.startswith(("transformer.", "lm_head.")):
        return name
    return "transformer." + name


def ignored(name: str, m: ModelConfig) -> bool:
    """Causal-mask buffers of old files, and the tied output matrix."""
    return name.endswith((".attn.bias", ".attn.masked_bias")) or (
        name == "lm_head.weight" and bool(m.tie_embeddings)
    )


def links(m: ModelConfig) -> list[Link]:
    h = "transformer.h.{i}."
    out = [
        Link("transformer.wte.weight", "embed/embedding"),
        Link("transformer.wpe.weight", "pos_embed/embedding"),
        Link("transformer.ln_f.weight", "ln_final/scale", split=0),
        Link("transformer.ln_f.bias", "ln_final/bias", split=0),
        Link(h + "ln_1.weight", "{layer}/ln_attn/scale", split=0),
        Link(h + "ln_1.bias", "{layer}/ln_attn/bias", split=0),
        Link(h + "ln_2.weight", "{layer}/ln_mlp/scale", split=0),
        Link(h + "ln_2.bias", "{layer}/ln_mlp/bias", split=0),
        Link(h + "attn.c_proj.weight", "{layer}/attn/out/kernel", split=2),
        Link(h + "attn.c_proj.bias", "{layer}/attn/out/bias", split=0),
        Link(h + "mlp.c_fc.weight", "{layer}/mlp/fc_in/kernel"),
        Link(h + "mlp.c_fc.bias", "{layer}/mlp/fc_in/bias", split=0),
        Link(h + "mlp.c_proj.weight", "{layer}/mlp/fc_out/kernel"),
        Link(h + "mlp.c_proj.bias", "{layer}/mlp/fc_out/bias", split=0),
    ]
    for part, name in enumerate(("query", "key", "value")):
        attn = f"{{layer}}/attn/{name}"
        out.append(Link(h + "attn.c_attn.weight", attn + "/kernel", part=part, parts=3))
        out.append(Link(h + "attn.c_attn.bias", attn + "/bias", split=0, part=part, parts=3))
    if not m.tie_embeddings:
        out.append(Link("lm_head.weight", "lm_head/kernel", transpose=True))
    return out
