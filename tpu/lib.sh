# shellcheck shell=bash
# Shared by the tpu/ scripts: option parsing, and `run`, which prints instead of
# running under --dry-run. Printed commands are shell-quoted, so they can be pasted
# back into a shell as they are.

set -euo pipefail

DRY_RUN=0
ZONE="${JAXLM_TPU_ZONE:-}"
PROJECT="${JAXLM_TPU_PROJECT:-}"
ARGS=()

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# One word as a shell reads it: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command line from words.
join_quoted() {
  local out="" word
  for word in "$@"; do
    out+="$(quote "$word") "
  done
  printf '%s' "${out% }"
}

# Print (--dry-run) or run one command.
run() {
  if ((DRY_RUN)); then
    join_quoted "$@"
    echo
  else
    "$@"
  fi
}

# The options every script takes; everything else is left in ARGS.
parse_common() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift ;;
      --zone=*) ZONE="${1#*=}" ;;
      --project) PROJECT="${2:?--project needs a value}"; shift ;;
      --project=*) PROJECT="${1#*=}" ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  [[ -n "$ZONE" ]] || die "--zone is required (or set JAXLM_TPU_ZONE)"
}

# gcloud's location flags for this run.
where() {
  local flags=("--zone=$ZONE")
  [[ -z "$PROJECT" ]] || flags+=("--project=$PROJECT")
  printf '%s\n' "${flags[@]}"
}

# Run a command line on every worker of the TPU VM or pod slice $1.
on_workers() {
  local name="$1" command="$2" worker="${3:-all}"
  local flags
  mapfile -t flags < <(where)
  run gcloud compute tpus tpu-vm ssh "$name" "${flags[@]}" "--worker=$worker" "--command=$command"
}
