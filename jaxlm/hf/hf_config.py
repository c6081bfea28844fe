"""Reading a Hugging Face `config.json`, with one error for what jaxlm can't express."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxlm.errors import JaxlmError

CONFIG_JSON = "config.json"


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_JSON
    if not path.is_file():
        raise JaxlmError(f"{directory}: no {CONFIG_JSON}, not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise JaxlmError(f"{path}: not valid JSON ({err})") from None


def require(hf: dict[str, Any], key: str, ok: bool, supported: str) -> None:
    """Refuse a config.json setting the jaxlm model can't reproduce, naming the key."""
    if not ok:
        raise JaxlmError(
            f"config.json: {key}={hf.get(key)!r} is not supported (jaxlm supports {supported})"
        )
