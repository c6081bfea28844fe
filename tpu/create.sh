#!/usr/bin/env bash
# Create a TPU VM or pod slice through a queued resource, and wait until it is ready.
#   tpu/create.sh NAME --type v5p-128 --zone us-east5-a [--project P] [--runtime V]
#                 [--spot] [--dry-run]
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
set -- "${ARGS[@]}"
NAME="" TYPE="" RUNTIME="" SPOT=0
while (($#)); do
  case "$1" in
    --type) TYPE="${2:?--type needs a value}"; shift ;;
    --runtime) RUNTIME="${2:?--runtime needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    -*) die "unknown option $1" ;;
    *) [[ -z "$NAME" ]] || die "one NAME only"; NAME="$1" ;;
  esac
  shift
done
[[ -n "$NAME" ]] || die "usage: create.sh NAME --type v5p-128 --zone ZONE [--dry-run]"
[[ -n "$TYPE" ]] || die "--type is required, e.g. v5p-128, v5litepod-16, v6e-8"

if [[ -z "$RUNTIME" ]]; then
  case "$TYPE" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default runtime for $TYPE; pass --runtime" ;;
  esac
fi

mapfile -t FLAGS < <(where)
CREATE=(gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${FLAGS[@]}"
  "--accelerator-type=$TYPE" "--runtime-version=$RUNTIME")
((SPOT)) && CREATE+=(--spot)
run "${CREATE[@]}"

DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${FLAGS[@]}"
  "--format=value(state.state)")
if ((DRY_RUN)); then
  run "${DESCRIBE[@]}"
  exit 0
fi
while true; do
  state="$("${DESCRIBE[@]}")"
  echo "$NAME: $state"
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDED) exit 1 ;;
  esac
  sleep 30
done
