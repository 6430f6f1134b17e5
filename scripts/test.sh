#!/usr/bin/env bash
# Install everything the tests need into .venv, then run the whole suite (slow tests included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" dev
for req in "$ROOT"/requirements-test-*.txt; do
  [[ -e "$req" ]] || continue
  # Reference packages (oracles for checkpoint compatibility) pull torchvision or
  # pytorch-lightning as dependencies; they are installed without them, on purpose.
  pip_q --no-deps -r "$req"
done
cd "$ROOT"
exec "$PY" -m pytest -n 2 -q "$@"
