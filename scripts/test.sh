#!/usr/bin/env bash
# The README's test command: install, lint, type-check, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
scripts/install.sh
echo "== ruff";   "$VENV/bin/ruff" check proxy tests scripts
echo "== mypy";   "$VENV/bin/mypy"
echo "== pytest"; "$VENV/bin/python" -m pytest "$@"
