"""Model families as Flax Linen modules, importable without the trainer."""

from __future__ import annotations

from flax import linen as nn

from jaxlm.config import ModelConfig
from jaxlm.models.decoder import Decoder, DecoderBlock
from jaxlm.models.encdec import T5
from jaxlm.models.encoder import BertEncoder, BertForPreTraining

__all__ = [
    "T5",
    "BertEncoder",
    "BertForPreTraining",
    "Decoder",
    "DecoderBlock",
    "build_model",
]

DECODER_FAMILIES = ("gpt2", "llama")


def build_model(config: ModelConfig, deterministic: bool = True) -> nn.Module:
    """The module for `config.family`, with the family's defaults filled in.

    gpt2 and llama are both the decoder-only `Decoder`; they differ in its fields. t5
    is the encoder-decoder `T5` and bert the encoder with MLM + NSP heads,
    `BertForPreTraining` (research use: the trainer trains neither yet).
    """
    if config.family in DECODER_FAMILIES:
        return Decoder(config.resolved(), deterministic=deterministic)
    if config.family == "t5":
        return T5(config.resolved(), deterministic=deterministic)
    if config.family == "bert":
        return BertForPreTraining(config.resolved(), deterministic=deterministic)
    raise ValueError(f"unknown model family {config.family!r}")
