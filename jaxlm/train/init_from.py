"""Fine-tuning: `init_from` starts a run from another model's weights instead of init.

`init_from` names a run or model directory (what `jaxlm train` and `jaxlm convert
from-hf` write) or `hf:PATH`, a Hugging Face directory read directly. The weights are
restored onto the training state's own shardings; their shapes must be those of the
run's model, and a difference is one error naming the parameter.

With `hf:PATH` the model is the checkpoint's (`resolve_init_from`): its architecture
comes from `config.json` and, unless `tokenizer.path` is set, its tokenizer from the
directory, so any config (e.g. configs/sft-gpt2-tiny.yaml) fine-tunes any supported
checkpoint in one command. The config's model section then contributes only how the
model runs: RUN_FIELDS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from flax import linen as nn

from jaxlm.config import Config, load_config
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.model_config import ModelConfig
from jaxlm.models.lora import ADAPTER_NAMES
from jaxlm.train.state import param_shapes

HF_PREFIX = "hf:"
# Model settings a run chooses whatever checkpoint it starts from.
RUN_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention", "dropout")


def _source(config: Config) -> tuple[bool, Path]:
    """(is a Hugging Face directory, the directory) of `init_from`."""
    spec = config.init_from
    if spec.startswith(HF_PREFIX):
        return True, Path(spec[len(HF_PREFIX) :])
    return False, Path(spec)


def check_init_from(config: Config) -> None:
    """Refuse an `init_from` that names nothing loadable, or a `lora.init_from` adapter
    that does not fit the model, before any work."""
    if config.lora.init_from and not config.init_from:
        raise ConfigError("lora.init_from", "needs init_from, the base the adapter was made for")
    if not config.init_from:
        return
    is_hf, directory = _source(config)
    wanted = "config.json" if is_hf else "config.yaml"
    if not (directory / wanted).is_file():
        kind = "a Hugging Face directory" if is_hf else "a run or model directory"
        raise ConfigError("init_from", f"{directory} is not {kind} (no {wanted})")
    if config.lora.init_from:
        from jaxlm.hf.peft import check_peft_adapter

        if not config.lora.rank:
            raise ConfigError("lora.init_from", "needs lora.rank (the adapter's rank)")
        model = resolve_init_from(config).model
        check_peft_adapter(config.lora.init_from, model, config.lora)


def resolve_init_from(config: Config) -> Config:
    """`config` with the model and tokenizer of an `init_from=hf:PATH` checkpoint: the
    architecture of its config.json (keeping the config's RUN_FIELDS), and, when
    `tokenizer.path` is empty, its tokenizer.json (or tokenizer.model). Other configs
    are returned as they are."""
    is_hf, directory = _source(config)
    if not config.init_from or not is_hf:
        return config
    from jaxlm.hf import architecture_for
    from jaxlm.hf.hf_config import read_hf_config

    hf = read_hf_config(directory)
    model = architecture_for(hf).config_from_hf(hf)
    model = dataclasses.replace(model, **{k: getattr(config.model, k) for k in RUN_FIELDS})
    if config.model.head:  # a task head of the config's own (QA from BertForPreTraining)
        model = dataclasses.replace(model, head=config.model.head)
    tokenizer = {"vocab_size": model.vocab_size}
    if not config.tokenizer.path:
        for name in ("tokenizer.json", "tokenizer.model"):
            if (directory / name).is_file():
                tokenizer["path"] = str((directory / name).absolute())
                break
        else:
            raise ConfigError(
                "tokenizer.path", f"{directory} has no tokenizer.json or tokenizer.model; set it"
            )
    return config.replace(model=model, tokenizer=tokenizer)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def check_same_shapes(source: dict[str, tuple], target: dict[str, tuple], where: Path) -> None:
    """One error naming the first parameter the two models don't share."""
    for path in sorted(set(source) | set(target)):
        if path not in source:
            raise JaxlmError(f"init_from {where}: it has no parameter {path} (the model has)")
        if path not in target:
            raise JaxlmError(f"init_from {where}: its parameter {path} is not in the model")
        if source[path] != target[path]:
            raise JaxlmError(
                f"init_from {where}: parameter {path} has shape {source[path]} there, "
                f"{target[path]} in this run's model"
            )


def _groups(paths: set[str], shared_top: set[str]) -> list[str]:
    """Parameter groups for a message: a top-level module, or, inside one both models
    have (the encoder), its submodule."""
    out = set()
    for path in paths:
        parts = path.split("/")
        out.add("/".join(parts[:2] if parts[0] in shared_top else parts[:1]))
    return sorted(out)


def _say_head_change(directory: Path, source: ModelConfig, target: ModelConfig, params: Any) -> set:
    """Print which parameter groups load, start fresh and are dropped when `source`'s
    head is not `target`'s; the paths of the loaded ones."""
    theirs = set(_shapes(nn.meta.unbox(param_shapes(source))))
    mine = set(_shapes(params))
    shared = theirs & mine
    top = {p.split("/")[0] for p in shared}
    print(
        f"init_from {directory}: loaded {', '.join(_groups(shared, set()))} "
        f"(head {source.resolved().head} -> {target.resolved().head}); freshly initialised: "
        f"{', '.join(_groups(mine - shared, top)) or 'nothing'}; dropped: "
        f"{', '.join(_groups(theirs - shared, top)) or 'nothing'}"
    )
    return shared


def _load_other_head(directory: Path, source: ModelConfig, target: ModelConfig, params: Any) -> Any:
    """Weights of a run with another task head (BERT pretrained with MLM + NSP, this
    run with the QA head): the parameters both heads' models have are loaded, those
    only this run's head has keep their fresh init, the source's own are left out.
    The shared body must match shape for shape, as it must for the same head."""
    from jaxlm.model_dir import restore_params

    def flat(tree: Any) -> dict[str, Any]:
        pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {"/".join(str(k.key) for k in path): leaf for path, leaf in pairs}

    # The source's architecture with this run's head: its body must be this model's.
    rebodied = dataclasses.replace(source, head=target.head, nsp_head=target.nsp_head)
    check_same_shapes(_shapes(nn.meta.unbox(param_shapes(rebodied))), _shapes(params), directory)
    shared = _say_head_change(directory, source, target, params)

    def subset(tree: Any, prefix: str = "") -> Any:
        """`tree` with only the shared leaves (None for none)."""
        if not isinstance(tree, Mapping):
            return tree if prefix[:-1] in shared else None
        kept = {k: subset(v, f"{prefix}{k}/") for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None} or None

    abstract = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), subset(params)
    )
    loaded = flat(restore_params(directory, abstract, partial=True))
    return _unflatten_like(params, lambda path, leaf: loaded.get(path, leaf))


def _unflatten_like(tree: Any, fn: Any, prefix: str = "") -> Any:
    """`tree` with each leaf replaced by `fn(its path, leaf)`."""
    if not isinstance(tree, Mapping):
        return fn(prefix[:-1], tree)
    return {k: _unflatten_like(v, fn, f"{prefix}{k}/") for k, v in tree.items()}


def _base(params: Any) -> Any:
    """`params` without LoRA adapters: the tree a checkpoint of the plain model holds."""
    if not isinstance(params, Mapping):
        return params
    return {k: _base(v) for k, v in params.items() if k not in ADAPTER_NAMES}


def _with_adapters(base: Any, params: Any) -> Any:
    """`base`'s weights, with the adapters of `params` put back beside them."""
    if not isinstance(params, Mapping):
        return base
    return {k: v if k in ADAPTER_NAMES else _with_adapters(base[k], v) for k, v in params.items()}


def load_init_params(config: Config, params: Any) -> Any:
    """The weights named by `config.init_from`, on the shardings of `params` (the
    freshly initialised ones, which they replace). With LoRA (`lora.rank` > 0) the
    checkpoint is the base model: its weights replace the base, and the adapters keep
    their init (B = 0, so training starts from the checkpoint's function), or, with
    `lora.init_from`, are the PEFT adapter's there."""
    from jaxlm.hf import read_hf_params
    from jaxlm.model_dir import CONFIG_FILE, restore_params

    abstract = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), _base(params)
    )
    is_hf, directory = _source(config)
    if is_hf:  # names and shapes are checked tensor by tensor while reading
        from jaxlm.hf import architecture_for
        from jaxlm.hf.hf_config import read_hf_config

        hf = read_hf_config(directory)
        theirs = architecture_for(hf).config_from_hf(hf)
        fresh = None  # the same head: every parameter from the checkpoint
        if theirs.resolved().head != config.model.resolved().head:
            source = dataclasses.replace(config.model, head=theirs.head, nsp_head=theirs.nsp_head)
            fresh = _base(params)
            _say_head_change(directory, source, config.model, fresh)
        base = read_hf_params(directory, config.model, abstract, fresh=fresh)
    else:
        source = load_config(directory / CONFIG_FILE).model
        if source.resolved().head != config.model.resolved().head:
            base = _load_other_head(directory, source, config.model, _base(params))
        else:
            shapes = _shapes(nn.meta.unbox(param_shapes(source)))
            check_same_shapes(shapes, _shapes(abstract), directory)
            base = restore_params(directory, abstract)
    params = _with_adapters(base, params)
    if config.lora.init_from:
        from jaxlm.hf.peft import load_peft_adapter

        params = load_peft_adapter(config.lora.init_from, config.model, config.lora, params)
    return params
