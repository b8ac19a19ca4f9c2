# Shepherd — every target calls one script or one command. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
export PYTHON VENV

.PHONY: help install run test lint typecheck load-test load-tools clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

install:  ## create .venv (if needed) and install Shepherd with the dev extra
	@scripts/install.sh

run:  ## start the mock upstream and the gateway on 127.0.0.1:8080 (config/gateway.yaml)
	@scripts/run_demo.sh

test:  ## install, then ruff, mypy and the whole pytest suite
	@scripts/test.sh

lint:  ## ruff on proxy/, tests/ and scripts/
	@scripts/install.sh >/dev/null && $(VENV)/bin/ruff check proxy tests scripts

typecheck:  ## mypy --strict on proxy/
	@scripts/install.sh >/dev/null && $(VENV)/bin/mypy

load-test:  ## gateway vs bare aiohttp forwarder vs direct; ARGS="--duration 10" to tune
	@scripts/install.sh >/dev/null && $(VENV)/bin/python scripts/loadtest.py $(ARGS)

load-tools:  ## install wrk, the C load generator load-test prefers (apt-get, as root)
	@scripts/install_loadtools.sh

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
