"""Results as a terminal table and as JSON."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(results: dict[str, Any], title: str = "") -> str:
    width = max([len(k) for k in results] + [6])
    lines = [title] if title else []
    lines += [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{k:<{width}}  {_fmt(v)}" for k, v in results.items()]
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str | os.PathLike) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
