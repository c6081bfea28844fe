"""T5 (`T5ForConditionalGeneration`) <-> jaxlm's `T5` (models/encdec.py).

Both generations of the checkpoints map onto one jaxlm model:
- T5 v1.0 (t5-small ...): `feed_forward_proj="relu"` (`wi`, `wo`), the head tied to the
  shared embedding and fed the decoder output times d_model**-0.5;
- T5 v1.1 / flan-t5: `"gated-gelu"` (`wi_0` gated by the tanh GELU, `wi_1`, `wo`:
  jaxlm's `mlp=geglu`), a separate `lm_head` and no rescaling (`tie_embeddings=false`),
  and often `d_kv * num_heads != d_model` (jaxlm's `d_kv`).

Whether the head is rescaled is what decides jaxlm's `tie_embeddings`: transformers 5
writes it as `scale_decoder_outputs` (and always `tie_word_embeddings: true`), older
files as `tie_word_embeddings` itself. The layers are unrolled (`layers_{i}`) and the
relative-position table lives in layer 0 of each stack only, so the links name every
layer's tensors explicitly; encoder and decoder may differ in depth.
"""

from __future__ import annotations

from typing import Any

from jaxlm.hf.hf_config import require
from jaxlm.hf.links import Link
from jaxlm.model_config import ModelConfig

MODEL_TYPE = "t5"
MLPS = {"relu": "relu", "gated-gelu": "geglu", "gated-gelu_new": "geglu"}
DEFAULT_MAX_LEN = 512  # T5's n_positions: it has no position table, but jaxlm needs a length


def scales_head(hf: dict[str, Any]) -> bool:
    """Whether the checkpoint's head sees the decoder output times d_model**-0.5."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    require(hf, "feed_forward_proj", proj in MLPS, " or ".join(MLPS))
    require(hf, "is_encoder_decoder", hf.get("is_encoder_decoder", True), "true")
    n_layers = hf["num_layers"]
    return ModelConfig(
        family="t5",
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        n_layers=n_layers,
        n_decoder_layers=hf.get("num_decoder_layers") or n_layers,
        n_heads=hf["num_heads"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        max_len=hf.get("n_positions", DEFAULT_MAX_LEN),
        dropout=hf.get("dropout_rate", 0.1),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm="rmsnorm",
        mlp=MLPS[proj],
        position="relative",
        use_bias=False,
        tie_embeddings=scales_head(hf),
    )


def fits(m: ModelConfig) -> bool:
    """Whether a jaxlm model is exactly a T5 (every t5-family model with HF's MLPs)."""
    return m.position == "relative" and m.mlp in ("relu", "geglu") and m.kv_heads == m.n_heads


def config_to_hf(m: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size,
        "d_model": m.d_model,
        "d_kv": m.head_dim,
        "d_ff": m.ff_dim,
        "num_layers": m.n_layers,
        "num_decoder_layers": m.n_decoder_layers or m.n_layers,
        "num_heads": m.n_heads,
        "relative_attention_num_buckets": m.relative_buckets,
        "relative_attention_max_distance": m.relative_max_distance,
        "dropout_rate": m.dropout,
        "layer_norm_epsilon": m.layer_norm_eps,
        "feed_forward_proj": "relu" if m.mlp == "relu" else "gated-gelu",
        "n_positions": m.max_len,
        "is_encoder_decoder": True,
        # Read as "rescale the head's input" by every transformers version; an untied
        # head is written as its own lm_head.weight, which transformers 5 keeps apart.
        "tie_word_embeddings": bool(m.tie_embeddings),
        "scale_decoder_outputs": bool(m.tie_embeddings),
    }


def special_ids(tokenizer: Any) -> dict[str, int]:
    """`decoder_start_token_id`: the token jaxlm's decoder starts from (BOS with a
    jaxlm sentencepiece tokenizer, as its seq2seq data does; else pad, as T5's)."""
    if tokenizer is None:
        return {"decoder_start_token_id": 0}
    import sentencepiece as spm

    bos, pad = tokenizer.bos_id(), max(tokenizer.pad_id(), 0)
    sentencepiece = isinstance(tokenizer, spm.SentencePieceProcessor)
    return {"decoder_start_token_id": bos if sentencepiece and bos >= 0 else pad}


def rename(name: str) -> str:
    return name


def ignored(name: str, m: ModelConfig) -> bool:
    """The stacks' copies of the shared embedding, the decoder's unused cross-attention
    table some files keep, and a tied head's copy of the embedding."""
    return (
        name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        or name.endswith("EncDecAttention.relative_attention_bias.weight")
        or (name == "lm_head.weight" and bool(m.tie_embeddings))
    )


def _attention(hf: str, jax: str) -> list[Link]:
    out = [Link(f"{hf}.{a}.weight", f"{jax}/{b}/kernel", transpose=True) for a, b in QKV]
    return [*out, Link(f"{hf}.o.weight", f"{jax}/out/kernel", transpose=True, split=2)]


QKV = (("q", "query"), ("k", "key"), ("v", "value"))


def _mlp(hf: str, jax: str, mlp: str) -> list[Link]:
    names = {"relu": (("wi", "fc_in"), ("wo", "fc_out"))}
    names["geglu"] = (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))
    return [Link(f"{hf}.{a}.weight", f"{jax}/{b}/kernel", transpose=True) for a, b in names[mlp]]


def _stack(m: ModelConfig, stack: str, n_layers: int) -> list[Link]:
    decoder = stack == "decoder"
    out = [Link(f"{stack}.final_layer_norm.weight", f"{stack}/ln_final/scale", split=0)]
    for i in range(n_layers):
        hf, jax = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
        out += [
            Link(f"{hf}.0.layer_norm.weight", f"{jax}/ln_self_attn/scale", split=0),
            *_attention(f"{hf}.0.SelfAttention", f"{jax}/self_attn"),
        ]
        if i == 0:
            bias = f"{hf}.0.SelfAttention.relative_attention_bias.weight"
            out.append(Link(bias, f"{jax}/relpos/embedding"))
        if decoder:
            out += [
                Link(f"{hf}.1.layer_norm.weight", f"{jax}/ln_cross_attn/scale", split=0),
                *_attention(f"{hf}.1.EncDecAttention", f"{jax}/cross_attn"),
            ]
        mlp = f"{hf}.{2 if decoder else 1}"
        out += [
            Link(f"{mlp}.layer_norm.weight", f"{jax}/ln_mlp/scale", split=0),
            *_mlp(f"{mlp}.DenseReluDense", f"{jax}/mlp", m.mlp),
        ]
    return out


def stored_links(links: list[Link], names: set[str]) -> list[Link]:
    """An unscaled head saved without `lm_head.weight` (transformers 5 drops it when it
    equals the embedding) starts as a copy of `shared.weight`."""
    if "lm_head.weight" in names:
        return links
    head = Link("shared.weight", "lm_head/kernel", transpose=True)
    return [head if link.jax == "lm_head/kernel" else link for link in links]


def links(m: ModelConfig) -> list[Link]:
    out = [
        Link("shared.weight", "embed/embedding"),
        *_stack(m, "encoder", m.n_layers),
        *_stack(m, "decoder", m.n_decoder_layers or m.n_layers),
    ]
    if not m.tie_embeddings:
        out.append(Link("lm_head.weight", "lm_head/kernel", transpose=True))
    return out
