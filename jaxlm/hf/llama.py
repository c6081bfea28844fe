"""Llama (`LlamaForCausalLM`) <-> jaxlm's `Decoder` with the llama family's parts.

Grouped-query attention is `n_kv_heads`; RoPE is the rotate-half layout HF uses, with
`rope_theta` and the `linear` and `llama3` scalings (transformers 5 writes them as
`rope_parameters`, older versions as `rope_theta` + `rope_scaling`; both are read).
"""

from __future__ import annotations

from typing import Any

from jaxlm.hf.hf_config import require
from jaxlm.hf.links import Link
from jaxlm.model_config import ModelConfig

MODEL_TYPE = "llama"
ROPE_TYPES = ("default", "linear", "llama3")


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings, from whichever of the two layouts the file uses."""
    legacy = dict(hf.get("rope_scaling") or {})
    if "type" in legacy:
        legacy.setdefault("rope_type", legacy.pop("type"))
    rope = {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0), **legacy}
    return {**rope, **(hf.get("rope_parameters") or {})}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "silu")
    require(hf, "attention_bias", not hf.get("attention_bias", False), "false")
    require(hf, "mlp_bias", not hf.get("mlp_bias", False), "false")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    require(hf, "head_dim", head_dim * n_heads == d_model, "hidden_size / num_attention_heads")
    rope = _rope(hf)
    kind = rope["rope_type"]
    require(rope, "rope_type", kind in ROPE_TYPES, " or ".join(ROPE_TYPES))
    scaling: dict[str, Any] = {}
    if kind != "default":
        scaling = {"rope_scaling": kind, "rope_scaling_factor": float(rope["factor"])}
    if kind == "llama3":
        scaling |= {
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_len": int(rope["original_max_position_embeddings"]),
        }
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm="rmsnorm",
        mlp="swiglu",
        position="rope",
        rope_base=float(rope["rope_theta"]),
        use_bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        **scaling,
    )


def fits(m: ModelConfig) -> bool:
    """Whether a jaxlm model is exactly a Llama."""
    parts = (m.norm, m.mlp, m.position, m.use_bias)
    return parts == ("rmsnorm", "swiglu", "rope", False) and m.sliding_window == 0


def config_to_hf(m: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": m.rope_scaling or "default", "rope_theta": m.rope_base}
    if m.rope_scaling:
        rope["factor"] = m.rope_scaling_factor
    if m.rope_scaling == "llama3":
        rope |= {
            "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_len,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ff_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "max_position_embeddings": m.max_len,
        "rms_norm_eps": m.layer_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": m.rope_base,
        "rope_parameters": rope,
        "tie_word_embeddings": bool(m.tie_embeddings),
    }


def rename(name: str) -> str:
    return name


def ignored(name: str, m: ModelConfig) -> bool:
    """Old files' RoPE frequency buffers, and the tied output matrix."""
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and bool(m.tie_embeddings)
    )


def links(m: ModelConfig) -> list[Link]:
    layer = "model.layers.{i}."
    out = [
        Link("model.embed_tokens.weight", "embed/embedding"),
        Link("model.norm.weight", "ln_final/scale", split=0),
        Link(layer + "input_layernorm.weight", "{layer}/ln_attn/scale", split=0),
        Link(layer + "post_attention_layernorm.weight", "{layer}/ln_mlp/scale", split=0),
        Link(layer + "self_attn.q_proj.weight", "{layer}/attn/query/kernel", transpose=True),
        Link(layer + "self_attn.k_proj.weight", "{layer}/attn/key/kernel", transpose=True),
        Link(layer + "self_attn.v_proj.weight", "{layer}/attn/value/kernel", transpose=True),
        Link(layer + "self_attn.o_proj.weight", "{layer}/attn/out/kernel", True, split=2),
        Link(layer + "mlp.gate_proj.weight", "{layer}/mlp/gate/kernel", transpose=True),
        Link(layer + "mlp.up_proj.weight", "{layer}/mlp/up/kernel", transpose=True),
        Link(layer + "mlp.down_proj.weight", "{layer}/mlp/down/kernel", transpose=True),
    ]
    if not m.tie_embeddings:
        out.append(Link("lm_head.weight", "lm_head/kernel", transpose=True))
    return out
