"""Joining a multi-process JAX run: `jax.distributed.initialize` from the config or env.

Every process of a pod slice runs the same `jaxlm train`; JAX's multi-controller
runtime makes their devices one mesh. This must happen before anything asks JAX for
its devices, so the CLI calls `initialize` right after reading the config. On Cloud
TPU VMs, GKE and SLURM, JAX finds the coordinator itself; elsewhere (e.g. several
CPU processes on one machine) the config or JAXLM_* variables name it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from jaxlm.config import DistributedConfig
from jaxlm.errors import JaxlmError

ENV_COORDINATOR = "JAXLM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLM_PROCESS_ID"


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise JaxlmError(f"environment variable {name}={value!r} is not an integer") from None


def resolve(config: DistributedConfig, env: Mapping[str, str] = os.environ) -> tuple[str, int, int]:
    """(coordinator, num_processes, process_id): the config first, then JAXLM_* variables."""
    coordinator = config.coordinator or env.get(ENV_COORDINATOR, "")
    num = config.num_processes or _int_env(env, ENV_NUM_PROCESSES, 0)
    pid = config.process_id if config.process_id >= 0 else _int_env(env, ENV_PROCESS_ID, -1)
    if coordinator and (num < 1 or not 0 <= pid < num):
        raise JaxlmError(
            f"config key 'distributed.coordinator': {coordinator} is set, so "
            "distributed.num_processes and distributed.process_id (or "
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}) must be too, with process_id "
            f"below num_processes; have {num} and {pid}"
        )
    return coordinator, num, pid


def initialize(config: DistributedConfig, env: Mapping[str, str] = os.environ) -> bool:
    """Join the run's other processes if there are any; True when JAX is now distributed."""
    if config.mode == "off" or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    coordinator, num, pid = resolve(config, env)
    try:
        if coordinator:
            # CPU processes need a collectives backend to talk to each other; TPUs ignore it.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                coordinator_address=coordinator, num_processes=num, process_id=pid
            )
            return True
        # TPU VMs, GKE, SLURM, Open MPI: JAX reads the cluster from its environment.
        jax.distributed.initialize()
        return True
    except RuntimeError as err:  # JAX was used already: too late to join anything
        if coordinator or config.mode == "on":
            raise JaxlmError(
                "distributed: jax.distributed.initialize must run before JAX is used "
                f"(call jaxlm.distributed.initialize first): {err}"
            ) from None
        return False
    except ValueError as err:  # no cluster around: one process on its own
        if config.mode == "on":
            raise JaxlmError(
                f"config key 'distributed.mode': on, but no cluster was detected ({err}); "
                "set distributed.coordinator, num_processes and process_id"
            ) from None
        return False
