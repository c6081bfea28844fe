#!/usr/bin/env bash
# Stop the run on every worker with SIGTERM: jaxlm saves a checkpoint and exits, so a
# later launch.sh with the same --run-dir resumes. --delete also deletes the slice.
#   tpu/stop.sh NAME --zone ZONE [--delete] [--dry-run]
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
set -- "${ARGS[@]}"
NAME="" DELETE=0
while (($#)); do
  case "$1" in
    --delete) DELETE=1 ;;
    -*) die "unknown option $1" ;;
    *) NAME="$1" ;;
  esac
  shift
done
[[ -n "$NAME" ]] || die "usage: stop.sh NAME --zone ZONE [--delete] [--dry-run]"
on_workers "$NAME" "test -f ~/jaxlm-train.pid && kill -TERM \"\$(cat ~/jaxlm-train.pid)\" || true"
if ((DELETE)); then
  mapfile -t FLAGS < <(where)
  run gcloud compute tpus queued-resources delete "$NAME" "${FLAGS[@]}" --force --quiet
fi
