"""jaxlm: a JAX/Flax training stack for language models.

Submodules import alone: `jaxlm.models` for the Flax modules, `jaxlm.data` for the
grain pipeline, `jaxlm.sharding`, `jaxlm.checkpoint`, `jaxlm.train` for the loop.
"""

__version__ = "0.1.0"
