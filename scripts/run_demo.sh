#!/usr/bin/env bash
# `make run`: the bundled mock upstream on 127.0.0.1:9001 and the gateway on
# $SHEPHERD_HOST:$SHEPHERD_PORT (default 127.0.0.1:8080) with config/gateway.yaml. No API key
# and no network needed. Ctrl-C or SIGTERM stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
scripts/install.sh
MOCK_PORT=${MOCK_PORT:-9001}
HOST=${SHEPHERD_HOST:-127.0.0.1}
PORT=${SHEPHERD_PORT:-8080}
pids=()
stop() {
    trap - EXIT INT TERM
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop EXIT INT TERM
"$VENV/bin/python" scripts/mock_upstream.py --port "$MOCK_PORT" --token-delay-ms 30 &
pids+=($!)
cat <<MSG

Shepherd is starting on http://$HOST:$PORT (mock upstream on :$MOCK_PORT). Try:

  curl -N http://$HOST:$PORT/v1/chat/completions \\
    -H "Authorization: Bearer sk-shepherd-demo" -H "Content-Type: application/json" \\
    -d '{"model": "mock-gpt", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}'

  Browser playground: http://$HOST:$PORT/ui/

MSG
MOCK_UPSTREAM_URL="http://127.0.0.1:$MOCK_PORT/v1" SHEPHERD_HOST="$HOST" SHEPHERD_PORT="$PORT" \
    "$VENV/bin/python" -m proxy serve --config config/gateway.yaml &
pids+=($!)
# Whichever ends first (the gateway on a signal or an error, or the mock) ends the demo.
wait -n "${pids[@]}" || true
