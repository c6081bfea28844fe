#!/usr/bin/env bash
# Follow the training log of one worker (0, the one that logs metrics, by default).
#   tpu/logs.sh NAME --zone ZONE [--worker N] [--dry-run]
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
set -- "${ARGS[@]}"
NAME="" WORKER=0
while (($#)); do
  case "$1" in
    --worker) WORKER="${2:?--worker needs a value}"; shift ;;
    -*) die "unknown option $1" ;;
    *) NAME="$1" ;;
  esac
  shift
done
[[ -n "$NAME" ]] || die "usage: logs.sh NAME --zone ZONE [--worker N] [--dry-run]"
on_workers "$NAME" "tail -n 100 -F ~/jaxlm-train.log" "$WORKER"
