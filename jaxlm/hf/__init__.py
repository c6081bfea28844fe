"""Hugging Face checkpoints in and out: GPT-2, Llama, BERT and T5.

- `load_hf_pretrained(HF_DIR)`: a Hugging Face directory (`config.json`,
  `*.safetensors`, a tokenizer) as `model, params, tokenizer, config`, streamed tensor
  by tensor onto the mesh;
- `convert_from_hf(HF_DIR, OUT)`: the same, written as a jaxlm model directory
  (`config.yaml`, tokenizer, `params/`) that `jaxlm train` (`init_from=OUT`),
  `load_pretrained` and the CLI take as is;
- `convert_to_hf(RUN_OR_MODEL_DIR, OUT)`: `config.json`, `model.safetensors` (sharded
  with an index past `max_shard_bytes`) and tokenizer files that transformers loads; a
  LoRA run is written with its adapters merged into the weights (models/lora.py).

Only numpy, safetensors and tokenizers are needed: no torch, no transformers. Each
architecture module (gpt2.py, llama.py, bert.py, t5.py) holds the config.json <-> ModelConfig
mapping and the tensor `Link`s; links.py does the reading and writing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from jaxlm import sharding as shd
from jaxlm.config import Config, MeshConfig, ModelConfig, TokenizerConfig, TrainConfig, validate
from jaxlm.errors import JaxlmError
from jaxlm.hf.hf_config import CONFIG_JSON, read_hf_config
from jaxlm.hf.links import check_tensors, hf_tensors, load_params
from jaxlm.hf.safetensors_io import DEFAULT_SHARD_BYTES, TensorReader, write_safetensors
from jaxlm.model_config import FAMILIES, Family
from jaxlm.model_dir import (
    TOKENIZER_FILES,
    Pretrained,
    load_model_dir,
    load_tokenizer_dir,
    save_pretrained,
)
from jaxlm.models.lora import merge_lora
from jaxlm.train.state import abstract_state

__all__ = ["convert_from_hf", "convert_to_hf", "load_hf_pretrained", "read_hf_params"]

# HF model_type -> the family whose `hf` mapping module (gpt2.py, ...) converts it.
HF_FAMILIES: dict[str, Family] = {f.hf: f for f in FAMILIES.values() if f.hf}
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # transformers >= 4.50 keeps the chat template here
)
ARCHITECTURE_FIELDS = ("family", "norm", "mlp", "position", "use_bias", "tie_embeddings")
# T5's sentencepiece model, read when a directory has no tokenizer.json (it lacks the
# <extra_id_N> sentinels transformers appends; tokenizer.json lists them).
SPIECE = "spiece.model"


def _mapping(family: Family) -> ModuleType:
    return importlib.import_module(f"jaxlm.hf.{family.hf}")


def architecture_for(hf: dict[str, Any]) -> ModuleType:
    """The mapping module for a config.json; one error for anything else."""
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        raise JaxlmError(
            f"config.json: model_type {model_type!r} is not supported "
            f"(jaxlm converts {', '.join(HF_FAMILIES)})"
        )
    known = HF_FAMILIES[model_type].hf_architectures
    for name in hf.get("architectures") or []:
        if name not in known:
            raise JaxlmError(
                f"config.json: architecture {name} is not supported "
                f"(for {model_type}, jaxlm converts {', '.join(known)})"
            )
    return _mapping(HF_FAMILIES[model_type])


def architecture_of(m: ModelConfig) -> ModuleType:
    """The Hugging Face architecture a jaxlm model is exactly, for export: its family's
    mapping if it fits, else another of the same kind's (a gpt2 with llama's parts)."""
    own = FAMILIES[m.family]
    kin = [f for f in FAMILIES.values() if f.kind == own.kind and f is not own]
    for candidate in (own, *kin):
        if candidate.hf and _mapping(candidate).fits(m):
            return _mapping(candidate)
    parts = f"norm={m.norm} mlp={m.mlp} position={m.position} use_bias={m.use_bias}"
    raise JaxlmError(
        f"model.family {m.family} with {parts}, n_kv_heads={m.kv_heads}, "
        f"sliding_window={m.sliding_window} is none of the exportable architectures "
        f"({', '.join(HF_FAMILIES)})"
    )


def read_hf_params(
    directory: str | Path, model: ModelConfig, abstract: Any, fresh: Any = None
) -> Any:
    """The params of a Hugging Face directory for the jaxlm model `model`, placed on the
    shardings of `abstract`; every tensor's name and shape is checked first.

    With `fresh` (params shaped as `abstract`) a checkpoint with another task head
    (BertForPreTraining into a QA-head BERT) gives the parameters both heads' models
    have; those only `model`'s head has are `fresh`'s, the checkpoint's own head is
    left out."""
    hf = read_hf_config(directory)
    module = architecture_for(hf)
    source = module.config_from_hf(hf).resolved()
    m = model.resolved()
    for key in ARCHITECTURE_FIELDS:
        if getattr(source, key) != getattr(m, key):
            raise JaxlmError(
                f"{directory}: model.{key} is {getattr(source, key)!r} in the checkpoint, "
                f"{getattr(m, key)!r} in the model"
            )
    links = module.links(m)
    ignored = partial(module.ignored, m=m)
    if fresh is not None and source.head != m.head:
        theirs = module.links(dataclasses.replace(m, head=source.head, nsp_head=source.nsp_head))
        links = [link for link in links if link in theirs]
        dropped = {
            link.hf.format(i=i) for link in theirs if link not in links for i in range(m.n_layers)
        }
        ignored = partial(_ignored_or_in, ignored, dropped)
    with TensorReader(directory, module.rename) as reader:
        if hasattr(module, "stored_links"):  # links that depend on what the file holds
            links = module.stored_links(links, reader.names())
        check_tensors(reader, links, abstract, m.n_layers, m.scan_layers, ignored)
        return load_params(reader, links, abstract, m.n_layers, m.scan_layers, fresh)


def _ignored_or_in(ignored: Any, names: set[str], name: str) -> bool:
    return ignored(name) or name in names


def _tokenizer_file(directory: Path) -> Path | None:
    for name in (*TOKENIZER_FILES, SPIECE):
        if (directory / name).is_file():
            return directory / name
    return None


def _load_tokenizer(directory: Path, tokenizer_file: Path) -> Any:
    if tokenizer_file.name == SPIECE:
        from jaxlm.data.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer_file)
    return load_tokenizer_dir(directory)


def imported_config(model: ModelConfig, name: str, tokenizer_path: str = "") -> Config:
    """A full, trainable jaxlm config around an imported model."""
    return validate(
        Config(
            name=name,
            model=model,
            tokenizer=TokenizerConfig(path=tokenizer_path, vocab_size=model.vocab_size),
            train=TrainConfig(seq_len=min(TrainConfig.seq_len, model.max_len)),
        )
    )


def load_hf_pretrained(hf_dir: str | Path, mesh: MeshConfig | None = None) -> Pretrained:
    """`model, params, tokenizer, config` of a Hugging Face directory; tokenizer is None
    when the directory has none."""
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    model = architecture_for(hf).config_from_hf(hf)
    tokenizer_file = _tokenizer_file(hf_dir)
    config = imported_config(
        model, hf_dir.name, str(tokenizer_file.absolute() if tokenizer_file else "")
    )
    if mesh is not None:
        config = config.replace(mesh=mesh)
    device_mesh, rules = shd.make_mesh(config.mesh), shd.logical_rules(config.mesh)
    model, abstract, _ = abstract_state(config, device_mesh, rules)
    params = read_hf_params(hf_dir, config.model, abstract)
    tokenizer = _load_tokenizer(hf_dir, tokenizer_file) if tokenizer_file else None
    return Pretrained(model, params, tokenizer, config)


def convert_from_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory as a jaxlm model directory; returns it."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    architecture_for(read_hf_config(hf_dir))  # a bad directory fails before anything else
    tokenizer_file = _tokenizer_file(hf_dir)
    if tokenizer_file is None:
        expected = " or ".join((*TOKENIZER_FILES, SPIECE))
        raise JaxlmError(f"{hf_dir}: no tokenizer (expected {expected})")
    _, params, _, config = load_hf_pretrained(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {tokenizer_file.name: tokenizer_file.name}
    if tokenizer_file.name == "tokenizer.json":
        names = {name: name for name in HF_TOKENIZER_FILES}
    if tokenizer_file.name == SPIECE:  # a sentencepiece model, as jaxlm names its own
        names = {SPIECE: "tokenizer.model"}
    for name, target in names.items():
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / target)
    path = out_dir / names[tokenizer_file.name]
    tokenizer = dataclasses.replace(config.tokenizer, path=str(path))
    config = dataclasses.replace(config, tokenizer=tokenizer)
    save_pretrained(out_dir, config, params)
    return out_dir


def _token_ids(tokenizer: Any) -> dict[str, int]:
    if tokenizer is None:
        return {}
    ids = {
        "bos_token_id": tokenizer.bos_id(),
        "eos_token_id": tokenizer.eos_id(),
        "pad_token_id": tokenizer.pad_id(),
    }
    return {key: value for key, value in ids.items() if value >= 0}


def _export_tokenizer(source: Path, out_dir: Path, max_len: int) -> None:
    from jaxlm.hf.spm_export import export_sentencepiece

    if (source / "tokenizer.model").is_file():
        export_sentencepiece(source / "tokenizer.model", out_dir, max_len)
        shutil.copyfile(source / "tokenizer.model", out_dir / "tokenizer.model")
        return
    for name in HF_TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)


def convert_to_hf(
    path: str | Path, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Write a jaxlm run or model directory as a Hugging Face directory; returns it."""
    path, out_dir = Path(path), Path(out_dir)
    _, params, tokenizer, config = load_model_dir(path)
    if config.lora.rank:  # a LoRA run: its adapters folded into plain weights
        params = merge_lora(params, config.lora)
    m = config.model.resolved()
    module = architecture_of(m)
    hf = {**module.config_to_hf(m), **_token_ids(tokenizer), "dtype": m.param_dtype}
    if hasattr(module, "special_ids"):  # an encoder-decoder's decoder start token
        hf |= module.special_ids(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(module.links(m), params, m.n_layers, m.scan_layers)
    write_safetensors(tensors, out_dir, max_shard_bytes)
    (out_dir / CONFIG_JSON).write_text(json.dumps(hf, indent=2) + "\n")
    _export_tokenizer(path, out_dir, m.max_len)
    return out_dir
