"""XLA options the train step is compiled with, per platform of the mesh's devices.

TPU: the SPMD partitioner does not merge ("CSE") two all-gathers of the same weight
shard once their size passes a threshold, to keep a gathered weight from living long.
With a scanned, rematerialised stack at one row per chip that left the backward
gathering the query weight and the attention norm's scale twice: two all-gathers a
layer more than MaxText's program, 1 GiB more per step for Llama-2-7B on v5p-8
(benchmarks/README.md). Raising the threshold, as EasyLM's TPU recipes do, merges
them; the merged gather lives only within one layer's backward.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

TPU = {"xla_tpu_spmd_threshold_for_allgather_cse": 10000}
BY_PLATFORM: dict[str, dict[str, Any]] = {"tpu": TPU}


def for_mesh(mesh: Mesh) -> dict[str, Any] | None:
    """The compile options for a step on `mesh`'s platform, or None for XLA's defaults."""
    options = BY_PLATFORM.get(mesh.devices.flat[0].platform)
    return dict(options) if options else None
