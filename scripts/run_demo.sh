#!/usr/bin/env bash
# `make run`: the bundled mock upstream on 127.0.0.1:9001 and the gateway on 127.0.0.1:8080
# with config/gateway.yaml. No API key and no network needed. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
scripts/install.sh
MOCK_PORT=${MOCK_PORT:-9001}
"$VENV/bin/python" scripts/mock_upstream.py --port "$MOCK_PORT" --token-delay-ms 30 &
mock_pid=$!
trap 'kill $mock_pid 2>/dev/null || true' EXIT INT TERM
cat <<MSG

Shepherd is starting on http://127.0.0.1:8080 (mock upstream on :$MOCK_PORT). Try:

  curl -N http://127.0.0.1:8080/v1/chat/completions \\
    -H "Authorization: Bearer sk-shepherd-demo" -H "Content-Type: application/json" \\
    -d '{"model": "mock-gpt", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}'

MSG
MOCK_UPSTREAM_URL="http://127.0.0.1:$MOCK_PORT/v1" "$VENV/bin/python" -m proxy serve --config config/gateway.yaml
