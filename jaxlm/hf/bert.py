"""BERT (`BertForPreTraining`, `BertForMaskedLM`) <-> jaxlm's `BertForPreTraining`, and
`BertForQuestionAnswering` <-> jaxlm's `BertForQuestionAnswering` (`model.head=qa`).

`BertForMaskedLM` has neither the pooler nor the NSP head: it maps to
`model.nsp_head=false`. The MLM decoder matrix is the word-embedding table (tied) and
its bias `cls.predictions.bias`; old files also store both under
`cls.predictions.decoder.*`, which are skipped, and name LayerNorm's parameters
`gamma`/`beta`. `BertForQuestionAnswering` has no pooler and no MLM/NSP heads, only
`qa_outputs` (d_model -> 2: start, end).
"""

from __future__ import annotations

from typing import Any

from jaxlm.hf.hf_config import require
from jaxlm.hf.links import Link
from jaxlm.model_config import ModelConfig

MODEL_TYPE = "bert"


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "hidden_act", hf.get("hidden_act", "gelu") == "gelu", "gelu (the exact erf GELU)")
    position = hf.get("position_embedding_type", "absolute")
    require(hf, "position_embedding_type", position == "absolute", "absolute")
    require(hf, "is_decoder", not hf.get("is_decoder", False), "false")
    architecture = (hf.get("architectures") or ["BertForPreTraining"])[0]
    qa = architecture == "BertForQuestionAnswering"
    return ModelConfig(
        family="bert",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_len=hf["max_position_embeddings"],
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        type_vocab_size=hf.get("type_vocab_size", 2),
        nsp_head=architecture == "BertForPreTraining",
        head="qa" if qa else "mlm_nsp",
        norm="layernorm",
        mlp="gelu",
        position="learned",
        use_bias=True,
        tie_embeddings=True,
    )


def fits(m: ModelConfig) -> bool:
    return m.kv_heads == m.n_heads and bool(m.use_bias)


def _architecture(m: ModelConfig) -> str:
    if m.resolved().head == "qa":
        return "BertForQuestionAnswering"
    return "BertForPreTraining" if m.nsp_head else "BertForMaskedLM"


def config_to_hf(m: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": [_architecture(m)],
        "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "intermediate_size": m.ff_dim,
        "max_position_embeddings": m.max_len,
        "type_vocab_size": m.type_vocab_size,
        "layer_norm_eps": m.layer_norm_eps,
        "hidden_act": "gelu",
        "hidden_dropout_prob": m.dropout,
        "attention_probs_dropout_prob": 0.0,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def rename(name: str) -> str:
    if name.endswith("LayerNorm.gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith("LayerNorm.beta"):
        return name[: -len("beta")] + "bias"
    return name


def ignored(name: str, m: ModelConfig) -> bool:
    """The position-id buffer, and the tied copies of the MLM decoder's matrix and bias."""
    return name.endswith("embeddings.position_ids") or name.startswith("cls.predictions.decoder.")


def _linear(hf: str, jax: str, split: int = 1) -> list[Link]:
    return [
        Link(hf + ".weight", jax + "/kernel", transpose=True, split=split),
        Link(hf + ".bias", jax + "/bias", split=0),
    ]


def _norm(hf: str, jax: str) -> list[Link]:
    return [
        Link(hf + ".weight", jax + "/scale", split=0),
        Link(hf + ".bias", jax + "/bias", split=0),
    ]


def links(m: ModelConfig) -> list[Link]:
    layer, block = "bert.encoder.layer.{i}.", "encoder/{layer}/"
    out = [
        Link("bert.embeddings.word_embeddings.weight", "encoder/embed/embedding"),
        Link("bert.embeddings.position_embeddings.weight", "encoder/pos_embed/embedding"),
        Link("bert.embeddings.token_type_embeddings.weight", "encoder/type_embed/embedding"),
        *_norm("bert.embeddings.LayerNorm", "encoder/ln_embed"),
        *_norm(layer + "attention.output.LayerNorm", block + "ln_attn"),
        *_norm(layer + "output.LayerNorm", block + "ln_mlp"),
        *_linear(layer + "attention.output.dense", block + "attn/out", split=2),
        *_linear(layer + "intermediate.dense", block + "mlp/fc_in"),
        *_linear(layer + "output.dense", block + "mlp/fc_out"),
    ]
    for name in ("query", "key", "value"):
        out += _linear(layer + f"attention.self.{name}", block + f"attn/{name}")
    if m.resolved().head == "qa":
        return out + _linear("qa_outputs", "qa_outputs")
    out += [
        Link("cls.predictions.bias", "mlm/bias", split=0),
        *_linear("cls.predictions.transform.dense", "mlm/transform"),
        *_norm("cls.predictions.transform.LayerNorm", "mlm/ln"),
    ]
    if m.nsp_head:
        out += _linear("bert.pooler.dense", "encoder/pooler")
        out += _linear("cls.seq_relationship", "nsp")
    return out
