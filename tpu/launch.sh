#!/usr/bin/env bash
# Start `jaxlm train` on every worker at once; each one logs to ~/jaxlm-train.log.
# JAX finds the other workers itself (jax.distributed on Cloud TPU VMs).
#   tpu/launch.sh NAME --zone ZONE CONFIG [key=value ...] [--run-dir DIR] [--dry-run]
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
(("${#ARGS[@]}" >= 2)) || die "usage: launch.sh NAME --zone ZONE CONFIG [key=value ...]"
NAME="${ARGS[0]}"
TRAIN_LINE="$(join_quoted jaxlm train "${ARGS[@]:1}" --no-progress)"
on_workers "$NAME" "cd ~/jaxlm && (nohup $TRAIN_LINE > ~/jaxlm-train.log 2>&1 & \
echo \$! > ~/jaxlm-train.pid)"
