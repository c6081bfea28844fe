"""Model families as Flax Linen modules, importable without the trainer."""

from __future__ import annotations

from flax import linen as nn

from jaxlm.config import ModelConfig
from jaxlm.models.decoder import Decoder, DecoderBlock

__all__ = ["Decoder", "DecoderBlock", "build_model"]


def build_model(config: ModelConfig, deterministic: bool = True) -> nn.Module:
    """The module for `config.family` (only the GPT-2 decoder so far)."""
    if config.family == "gpt2":
        return Decoder(config, deterministic=deterministic)
    raise ValueError(f"unknown model family {config.family!r}")
