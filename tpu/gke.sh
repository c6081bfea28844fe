#!/usr/bin/env bash
# Run `jaxlm train` on N TPU slices of a GKE cluster as a JobSet (tpu/jobset.yaml).
#   tpu/gke.sh NAME --type v5p-128 --slices 2 --image IMAGE CONFIG [key=value ...]
#              [--dry-run]        (--dry-run prints the manifest and the kubectl command)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"

DRY_RUN=0 NAME="" TYPE="" SLICES=1 IMAGE="" MAX_RESTARTS=3 TRAIN=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --type) TYPE="${2:?--type needs a value}"; shift ;;
    --slices) SLICES="${2:?--slices needs a value}"; shift ;;
    --image) IMAGE="${2:?--image needs a value}"; shift ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift ;;
    *) if [[ -z "$NAME" ]]; then NAME="$1"; else TRAIN+=("$1"); fi ;;
  esac
  shift
done
[[ -n "$NAME" && -n "$TYPE" && -n "$IMAGE" && "${#TRAIN[@]}" -ge 1 ]] ||
  die "usage: gke.sh NAME --type v5p-128 --slices N --image IMAGE CONFIG [key=value ...]"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer"

# Cloud names count TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e.
generation="${TYPE%-*}" size="${TYPE##*-}"
[[ "$size" =~ ^[0-9]+$ ]] || die "--type $TYPE: expected e.g. v5p-128, v5litepod-16, v6e-8"
case "$generation" in
  v4) GKE_ACCELERATOR=tpu-v4-podslice chips=$((size / 2)) dims=3 ;;
  v5p) GKE_ACCELERATOR=tpu-v5p-slice chips=$((size / 2)) dims=3 ;;
  v5e | v5litepod) GKE_ACCELERATOR=tpu-v5-lite-podslice chips=$size dims=2 ;;
  v6e) GKE_ACCELERATOR=tpu-v6e-slice chips=$size dims=2 ;;
  *) die "--type $TYPE: unknown TPU generation $generation" ;;
esac
((chips >= 1 && (chips & (chips - 1)) == 0)) || die "--type $TYPE: not a power-of-two slice"

# The usual slice shape: powers of two, grown one dimension at a time (as jaxlm/aot.py).
shape=(1 1 1)
((dims == 3)) || shape=(1 1)
for ((i = 0, n = chips; n > 1; i++, n /= 2)); do
  shape[i % dims]=$((shape[i % dims] * 2))
done
mapfile -t grown < <(printf '%s\n' "${shape[@]}" | grep -vx 1 | sort -n)
while ((${#grown[@]} < dims)); do grown+=(1); done
TOPOLOGY="$(IFS=x; echo "${grown[*]}")"
CHIPS_PER_HOST=$((chips < 4 ? chips : 4))
HOSTS=$((chips / CHIPS_PER_HOST))

json_list() {
  local out="" word
  for word in "$@"; do
    word="${word//\\/\\\\}"
    out+="\"${word//\"/\\\"}\", "
  done
  printf '[%s]' "${out%, }"
}
COMMAND="$(json_list jaxlm train "${TRAIN[@]}" --no-progress)"

# shellcheck disable=SC2016  # the ${...} in single quotes are the template's, literally
render() {
  local line
  while IFS= read -r line; do
    line="${line//'${NAME}'/$NAME}"
    line="${line//'${SLICES}'/$SLICES}"
    line="${line//'${HOSTS}'/$HOSTS}"
    line="${line//'${MAX_RESTARTS}'/$MAX_RESTARTS}"
    line="${line//'${GKE_ACCELERATOR}'/$GKE_ACCELERATOR}"
    line="${line//'${TOPOLOGY}'/$TOPOLOGY}"
    line="${line//'${IMAGE}'/$IMAGE}"
    line="${line//'${COMMAND}'/$COMMAND}"
    line="${line//'${CHIPS_PER_HOST}'/$CHIPS_PER_HOST}"
    printf '%s\n' "$line"
  done <"$HERE/jobset.yaml"
}

if ((DRY_RUN)); then
  render
  echo "---"
  echo "kubectl apply -f -"
else
  render | kubectl apply -f -
fi
