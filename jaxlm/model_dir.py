"""A jaxlm run directory (`jaxlm train`: config.yaml, a tokenizer, checkpoints/) or
model directory (`save_pretrained`: config.yaml, a tokenizer, params/), read onto a mesh
and written. Below `jaxlm.hf` and `jaxlm.pretrained`, which both build on it.

Directories go through `etils.epath` (jaxlm/paths.py), so a run trained into a bucket
loads from `gs://` as it is: `pathlib.Path` would fold `gs://b` into `gs:/b`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn

from jaxlm import sharding as shd
from jaxlm.config import Config, MeshConfig, load_config, to_yaml
from jaxlm.errors import JaxlmError
from jaxlm.integrity import incomplete_steps
from jaxlm.paths import PathLike, as_path
from jaxlm.train.state import abstract_state

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


def load_tokenizer_dir(directory: PathLike) -> Any:
    """The tokenizer stored in a run or model directory (both loaders read the file's
    bytes through epath, so a gs:// tokenizer needs no local copy)."""
    from jaxlm.data.tokenizer import load_tokenizer

    directory = epath.Path(directory)
    if (directory / "tokenizer.model").is_file():
        return load_tokenizer(directory / "tokenizer.model")
    if (directory / "tokenizer.json").is_file():
        from jaxlm.data.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(directory)
    raise JaxlmError(f"{directory}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")


def _latest_step(checkpoints: epath.Path) -> int:
    """The newest committed step. On object stores a save that never finished leaves
    a step directory under its final name (only the missing commit file tells), so
    unfinished steps are told by the rule resuming uses (`integrity.incomplete_steps`)."""
    unfinished = {p.name for p in incomplete_steps(checkpoints)}
    steps = sorted(
        int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.name not in unfinished
    )
    if not steps:
        raise JaxlmError(f"{checkpoints}: no finished checkpoint to load")
    return steps[-1]


def _restore_params(directory: epath.Path, abstract: Any, what: str, partial: bool = False) -> Any:
    """Params from an orbax tree at `directory`; `what` names it in errors. `partial`:
    `abstract` may be part of the saved params (a fine-tune with another head)."""
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
                    partial_restore=partial,
                ),
            )
    except Exception as err:  # orbax/tensorstore raise many types for unreadable data
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise JaxlmError(f"{directory}: cannot restore the params: {first_line}") from None


def restore_params(directory: PathLike, abstract: Any, partial: bool = False) -> Any:
    """The params of a model directory (`params/`) or a run directory (its newest
    committed checkpoint), restored onto the shardings of `abstract` (with `partial`,
    a part of them)."""
    directory = epath.Path(directory)
    if (directory / PARAMS_DIR).is_dir():
        return _restore_params(as_path(directory / PARAMS_DIR), abstract, "params", partial)
    if (directory / CHECKPOINTS_DIR).is_dir():
        step = _latest_step(directory / CHECKPOINTS_DIR)
        state_dir = as_path(directory / CHECKPOINTS_DIR / str(step) / "state")
        return _restore_params(state_dir, abstract, "state")
    raise JaxlmError(f"{directory}: no {PARAMS_DIR}/ or {CHECKPOINTS_DIR}/ with weights")


def load_model_dir(
    directory: PathLike, mesh: MeshConfig | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Pretrained:
    """A run or model directory, local or gs://, on the mesh of `mesh` (default: the
    config's)."""
    directory = epath.Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise JaxlmError(f"{directory}: not a run or model directory (no {CONFIG_FILE})")
    config = load_config(directory / CONFIG_FILE, overrides)
    if mesh is not None:
        config = config.replace(mesh=mesh)
    device_mesh, rules = shd.make_mesh(config.mesh), shd.logical_rules(config.mesh)
    model, abstract, _ = abstract_state(config, device_mesh, rules)
    params = restore_params(directory, abstract)
    return Pretrained(model, params, load_tokenizer_dir(directory), config)


def save_pretrained(directory: PathLike, config: Config, params: Any) -> epath.Path:
    """Write a model directory, local or gs://: `config.yaml` and `params/` (the
    tokenizer is the caller's to copy in, as `tokenizer.model` or `tokenizer.json`)."""
    directory = as_path(directory)  # absolute when local: orbax requires it
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(to_yaml(config))
    target = directory / PARAMS_DIR
    params = nn.meta.unbox(params)  # straight from `init`, params carry logical boxes
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(target, args=ocp.args.PyTreeSave(params), force=True)
    return directory
