#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install teal into it.
# Sourced by scripts/demo.sh and scripts/test.sh; TEAL_VENV overrides the location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TEAL_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# torch first, pinned: left to the resolver, pip would fetch a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_q "torch==2.13.0"
fi
pip_q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
"$PY" -c "import teal_cli" || { echo "teal failed to install" >&2; exit 1; }
export PATH="$VENV/bin:$PATH"
