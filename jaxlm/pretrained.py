"""One entry point for every model jaxlm can run: `load_pretrained(PATH)`.

PATH may be
- a run directory (`config.yaml`, a tokenizer, `checkpoints/<step>/`): the params of the
  newest checkpoint are restored, without the optimizer state;
- a model directory (`config.yaml`, a tokenizer, `params/`): what `save_pretrained`
  and `jaxlm convert from-hf` write;
- a Hugging Face directory (`config.json` + `*.safetensors`), converted on the fly.

Params are restored straight onto the mesh of `mesh` (default: the config's), sharded
by the logical rules, so a model is never held whole in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import linen as nn

from jaxlm import sharding as shd
from jaxlm.config import Config, MeshConfig, load_config, to_yaml
from jaxlm.errors import JaxlmError
from jaxlm.models import build_model

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


@dataclass
class Pretrained:
    """What `load_pretrained` returns; unpacks as `model, params, tokenizer, config`."""

    model: nn.Module
    params: Any
    tokenizer: Any  # the sentencepiece-processor interface, see data/tokenizer.py
    config: Config

    def __iter__(self):
        return iter((self.model, self.params, self.tokenizer, self.config))


def abstract_params(config: Config, mesh: jax.sharding.Mesh, rules: shd.Rules) -> tuple[Any, Any]:
    """(params as ShapeDtypeStructs with shardings, the shardings) for `config.model`."""
    model = build_model(config.model)
    tokens = jnp.zeros((1, min(8, config.model.max_len)), jnp.int32)
    boxed = jax.eval_shape(lambda r: model.init(r, tokens)["params"], jax.random.PRNGKey(0))
    shardings = shd.logical_shardings(boxed, mesh, rules)
    shd.check_divisible(boxed, shardings)
    abstract = jax.tree_util.tree_map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def load_tokenizer_dir(directory: Path) -> Any:
    """The tokenizer stored in a run or model directory."""
    from jaxlm.data.tokenizer import load_tokenizer

    if (directory / "tokenizer.model").is_file():
        return load_tokenizer(directory / "tokenizer.model")
    if (directory / "tokenizer.json").is_file():
        from jaxlm.data.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(directory)
    raise JaxlmError(f"{directory}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")


def _latest_step(checkpoints: Path) -> int:
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    if not steps:
        raise JaxlmError(f"{checkpoints}: no finished checkpoint to load")
    return steps[-1]


def _restore_params(directory: Path, abstract: Any, what: str) -> Any:
    """Params from an orbax tree at `directory`; `what` names it in errors."""
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            if what == "state":  # a TrainState tree: take `params`, leave the rest on disk
                restored = checkpointer.restore(
                    directory,
                    args=ocp.args.PyTreeRestore(
                        item={"params": abstract},
                        restore_args=ocp.checkpoint_utils.construct_restore_args(
                            {"params": abstract}
                        ),
                        partial_restore=True,
                    ),
                )
                return restored["params"]
            return checkpointer.restore(
                directory,
                args=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                ),
            )
    except Exception as err:  # orbax/tensorstore raise many types for unreadable data
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise JaxlmError(f"{directory}: cannot restore the params: {first_line}") from None


def restore_params(directory: Path, abstract: Any) -> Any:
    """The params of a model directory (`params/`) or a run directory (its newest
    checkpoint), restored onto the shardings of `abstract`."""
    directory = Path(directory)
    if (directory / PARAMS_DIR).is_dir():
        return _restore_params((directory / PARAMS_DIR).absolute(), abstract, "params")
    if (directory / CHECKPOINTS_DIR).is_dir():
        step = _latest_step(directory / CHECKPOINTS_DIR)
        state_dir = (directory / CHECKPOINTS_DIR / str(step) / "state").absolute()
        return _restore_params(state_dir, abstract, "state")
    raise JaxlmError(f"{directory}: no {PARAMS_DIR}/ or {CHECKPOINTS_DIR}/ with weights")


def load_pretrained(
    path: str | Path,
    mesh: MeshConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Pretrained:
    """`model, params, tokenizer, config = load_pretrained(PATH)`; see the module doc.

    `overrides` are `key=value` config overrides (e.g. `model.attention=dot_product`);
    model shapes must stay those of the checkpoint.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise JaxlmError(f"model path {directory} is not a directory")
    if not (directory / CONFIG_FILE).is_file():
        if (directory / "config.json").is_file():
            from jaxlm.hf import load_hf_pretrained  # converted on the fly

            return load_hf_pretrained(directory, mesh=mesh)
        raise JaxlmError(
            f"{directory}: not a run, model or Hugging Face directory (no {CONFIG_FILE} "
            "or config.json)"
        )
    config = load_config(directory / CONFIG_FILE, overrides)
    if mesh is not None:
        config = config.replace(mesh=mesh)
    device_mesh = shd.make_mesh(config.mesh)
    rules = shd.logical_rules(config.mesh)
    abstract, _ = abstract_params(config, device_mesh, rules)
    params = restore_params(directory, abstract)
    tokenizer = load_tokenizer_dir(directory)
    return Pretrained(build_model(config.model), params, tokenizer, config)


def save_pretrained(directory: str | Path, config: Config, params: Any) -> Path:
    """Write a model directory: `config.yaml` and `params/` (the tokenizer is the
    caller's to copy in, as `tokenizer.model` or `tokenizer.json`)."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(to_yaml(config))
    target = directory / PARAMS_DIR
    params = nn.meta.unbox(params)  # straight from `init`, params carry logical boxes
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(target, args=ocp.args.PyTreeSave(params), force=True)
    return directory
