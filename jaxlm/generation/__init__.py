"""Text generation with a KV cache: `generate_ids` (token ids in and out), the sampling
rules, and the compiled programs behind them. `jaxlm.pipeline` and `jaxlm generate`
put text around it."""

from jaxlm.generation.api import Generation, bucket, generate_ids
from jaxlm.generation.sampling import Sampling, next_token, nucleus_mask, top_p_filter

__all__ = [
    "Generation",
    "Sampling",
    "bucket",
    "generate_ids",
    "next_token",
    "nucleus_mask",
    "top_p_filter",
]
