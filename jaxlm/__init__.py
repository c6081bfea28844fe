"""jaxlm: a JAX/Flax training stack for language models.

Submodules import alone: `jaxlm.models` for the Flax modules, `jaxlm.data` for the
grain pipeline, `jaxlm.sharding`, `jaxlm.checkpoint`, `jaxlm.train` for the loop.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`jaxlm.pipeline` and `jaxlm.load_pretrained` import JAX on first use, so
    `import jaxlm` stays light."""
    if name == "pipeline":  # the module, which is callable as its `pipeline` function
        import importlib

        return importlib.import_module("jaxlm.pipeline")
    if name == "load_pretrained":  # model, params, tokenizer, config = load_pretrained(PATH)
        from jaxlm.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
