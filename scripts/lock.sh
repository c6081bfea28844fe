#!/usr/bin/env bash
# Regenerate requirements/test-lock.txt: the exact versions of everything the test
# extras pull in, resolved today by pip into a scratch virtual environment.
#
#   bash scripts/lock.sh
#
# pyproject.toml keeps lower bounds (research code installs jaxlm beside its own
# pins); this lock is what the README's commands and .ci/run install against.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -e '.[test]'
{
  echo "# The test extras' dependency set, resolved by pip; regenerate with scripts/lock.sh."
  echo "# Used as a constraints file: pip install -c requirements/test-lock.txt -e '.[test]'"
  # A local build tag (torch's +cpu) would tie the lock to one index; the version alone
  # lets pip take the CPU build where the machine has it.
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$//'
} >requirements/test-lock.txt
echo "wrote requirements/test-lock.txt ($(grep -vc '^#' requirements/test-lock.txt) packages)"
