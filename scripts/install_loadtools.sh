#!/usr/bin/env bash
# Try to install wrk, the C load generator `make load-test ARGS=--compare` prefers (it costs
# about two thirds of the CPU per request of scripts/loadtest_client.py, which matters on a
# 2-core machine). Only `make load-tools` (and CI, for the test that drives wrk) runs this:
# `make load-test` never installs system packages.
# Never fails: without wrk, scripts/loadtest.py falls back to the Python generator and says so.
set -uo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "wrk not found; installing it with apt-get (Debian package wrk)"
    export DEBIAN_FRONTEND=noninteractive
    if timeout 120 apt-get install -y -qq wrk >/dev/null 2>&1 \
        || { timeout 120 apt-get update -qq >/dev/null 2>&1 \
             && timeout 120 apt-get install -y -qq wrk >/dev/null 2>&1; }; then
        echo "installed wrk"
        exit 0
    fi
    echo "could not install wrk with apt-get; the load test uses the Python generator"
else
    echo "wrk not found: install it (apt-get install wrk, brew install wrk) for a cheaper" \
         "load generator in --compare; using the Python generator meanwhile"
fi
exit 0
