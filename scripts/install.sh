#!/usr/bin/env bash
# Create the virtualenv if needed and install Shepherd with its dev extra.
# Re-installs only when setup.py changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.shepherd-installed"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    touch "$stamp"
    echo "installed shepherd-gateway[dev] into $VENV"
fi
