"""`jaxlm plot`: several runs' metrics.jsonl overlaid on one figure (matplotlib).

Four panels against step: train loss, eval loss, learning rate and tokens/s, one
colour per run, so runs of different settings compare at a glance without TensorBoard.
A bare `Figure` renders with the Agg canvas: no pyplot, no display, no global state.
"""

from __future__ import annotations

import os

from etils import epath
from matplotlib.figure import Figure

from jaxlm.errors import JaxlmError
from jaxlm.train.metrics import read_metrics

PANELS = (("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"))
PANELS += (("tokens_per_sec", "tokens/s"),)


def run_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = epath.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise JaxlmError(f"{run_dir}: no metrics.jsonl (not a run directory)")
    return read_metrics(path)


def plot_runs(run_dirs: list[str], out: str | os.PathLike | None = None) -> Figure:
    """The figure of `run_dirs` (written to `out` as PNG when given); each panel has
    one line per run that logged that metric, labelled by the run directory."""
    runs = [(os.path.basename(os.path.normpath(str(d))), run_metrics(d)) for d in run_dirs]
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for name, records in runs:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True), label=name, marker="." if len(points) < 3 else ""
                )
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig
