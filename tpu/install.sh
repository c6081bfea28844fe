#!/usr/bin/env bash
# Copy this checkout (its committed HEAD) to every worker and install it with libtpu.
#   tpu/install.sh NAME --zone ZONE [--project P] [--dry-run]
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
(("${#ARGS[@]}" == 1)) || die "usage: install.sh NAME --zone ZONE [--dry-run]"
NAME="${ARGS[0]}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/jaxlm-$NAME.tar.gz"

mapfile -t FLAGS < <(where)
run git -C "$REPO" archive --format=tar.gz -o "$TARBALL" HEAD
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:jaxlm.tar.gz" "${FLAGS[@]}" --worker=all
on_workers "$NAME" "rm -rf ~/jaxlm && mkdir ~/jaxlm && tar xzf ~/jaxlm.tar.gz -C ~/jaxlm && \
cd ~/jaxlm && python3 -m pip install --quiet -e \".[tpu]\""
