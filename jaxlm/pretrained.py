"""One entry point for every model jaxlm can run: `load_pretrained(PATH)`.

PATH may be
- a run directory (`config.yaml`, a tokenizer, `checkpoints/<step>/`): the params of the
  newest checkpoint are restored, without the optimizer state;
- a model directory (`config.yaml`, a tokenizer, `params/`): what `save_pretrained`
  and `jaxlm convert from-hf` write;
- a Hugging Face directory (`config.json` + `*.safetensors`), converted on the fly.

Run and model directories may be on Cloud Storage (`gs://bucket/run`, read through
etils.epath as training writes them); a Hugging Face directory must be local.

Params are restored straight onto the mesh of `mesh` (default: the config's), sharded
by the logical rules, so a model is never held whole in host memory. Imports point one
way: this module uses `jaxlm.hf` and `jaxlm.model_dir`; neither imports it.
"""

from __future__ import annotations

from pathlib import Path

from etils import epath

from jaxlm.config import MeshConfig
from jaxlm.errors import JaxlmError
from jaxlm.model_dir import (  # noqa: F401  (re-exported: the public names live here)
    CONFIG_FILE,
    Pretrained,
    load_model_dir,
    load_tokenizer_dir,
    restore_params,
    save_pretrained,
)
from jaxlm.paths import is_remote


def load_pretrained(
    path: str | Path,
    mesh: MeshConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Pretrained:
    """`model, params, tokenizer, config = load_pretrained(PATH)`; see the module doc.

    `overrides` are `key=value` config overrides (e.g. `model.attention=dot_product`);
    model shapes must stay those of the checkpoint.
    """
    directory = epath.Path(path)  # pathlib would fold gs://b into gs:/b
    if not directory.is_dir():
        raise JaxlmError(f"model path {directory} is not a directory")
    if (directory / CONFIG_FILE).is_file():
        loaded = load_model_dir(directory, mesh, overrides)
    elif (directory / "config.json").is_file():
        from jaxlm.hf import load_hf_pretrained  # converted on the fly

        if is_remote(directory):  # its safetensors reader takes local files only
            raise JaxlmError(
                f"{directory}: a Hugging Face directory must be local; copy it to a "
                "local directory first"
            )
        loaded = load_hf_pretrained(directory, mesh=mesh)
    else:
        raise JaxlmError(
            f"{directory}: not a run, model or Hugging Face directory "
            f"(no {CONFIG_FILE} or config.json)"
        )
    # Ids past the embedding table read as NaN or garbage, never as an error.
    pieces, vocab = loaded.tokenizer.get_piece_size(), loaded.config.model.vocab_size
    if pieces > vocab:
        raise JaxlmError(
            f"{directory}: the tokenizer has {pieces} pieces, more than the model's "
            f"vocabulary of {vocab} (model.vocab_size)"
        )
    return loaded
