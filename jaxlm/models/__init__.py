"""Model families as Flax Linen modules, importable without the trainer."""

from __future__ import annotations

import dataclasses

import jax
from flax import linen as nn

from jaxlm.model_config import LoraConfig, ModelConfig, family_of
from jaxlm.models.attention import resolve_attention
from jaxlm.models.decoder import Decoder, DecoderBlock
from jaxlm.models.encdec import T5
from jaxlm.models.encoder import BertEncoder, BertForPreTraining, BertForQuestionAnswering

__all__ = [
    "T5",
    "BertEncoder",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "Decoder",
    "DecoderBlock",
    "build_model",
]


def build_model(
    config: ModelConfig,
    deterministic: bool = True,
    platform: str | None = None,
    seq_len: int | None = None,
    lora: LoraConfig | None = None,
) -> nn.Module:
    """The family's module (`family_of(config).module`, its head's) for `config` with the
    family's defaults filled in and `attention: auto` resolved for `platform` (default:
    JAX's backend) and rows of `seq_len` tokens (None: not known). Callers compiling for
    other devices than the local ones (AOT for TPU on a CPU host) pass their platform,
    so the model is the one that will run there. `lora` (rank > 0, decoders) adds
    low-rank adapters (layers.EinsumDense).
    """
    config = config.resolved()
    attention = resolve_attention(config, platform or jax.default_backend(), seq_len)
    config = dataclasses.replace(config, attention=attention)
    module = globals()[family_of(config).module]
    if lora is not None and lora.rank > 0:
        return module(config, deterministic=deterministic, lora=lora.frozen())
    return module(config, deterministic=deterministic)
