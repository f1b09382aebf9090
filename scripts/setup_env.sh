#!/usr/bin/env bash
# Creates .venv with Python 3.12 (pyenv: .python-version) and installs v4jax.
#   bash scripts/setup_env.sh          # package only
#   bash scripts/setup_env.sh test     # + test extra (torch, transformers, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.12}"
if ! command -v "$PY" >/dev/null; then
  echo "setup_env: $PY not found (needs Python >= 3.12; pyenv reads .python-version)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
