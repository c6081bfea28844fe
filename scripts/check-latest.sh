#!/usr/bin/env bash
# For maintainers, now and then (not part of .ci/run): do the newest releases that
# pyproject.toml's lower bounds admit still pass? Installs without the lock into a
# scratch virtual environment, runs the suite, and prints what differs from the lock.
#
#   bash scripts/check-latest.sh [pytest args...]
#
# Green: regenerate the lock (scripts/lock.sh) to move CI onto these versions.
# Red: the diff below names the releases to look at first.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade -e '.[test]'
echo "versions that differ from requirements/test-lock.txt (lock -> latest):"
"$venv/bin/pip" freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$//' | sort >"$venv/latest.txt"
diff <(grep -v '^#' requirements/test-lock.txt | sort) "$venv/latest.txt" | grep '^[<>]' || true
"$venv/bin/python" -m pytest "$@"
