# Two entry points for a fresh machine: `make dev` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)

.PHONY: dev test install redis-server bench

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins here
	$(PY) -m pip install --quiet -e '.[test,dev]' --config-settings editable_mode=compat
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Integration tests start their own redis-server on a free port; it must be on PATH.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }

dev: install
	$(VENV)/bin/twistd --nodaemon --pidfile= chatgateway --dev

test: install redis-server
	$(PY) -m pytest -q tests

# The benchmark suite (not a test): about 30 minutes; see bench/README.md.
bench: install redis-server
	$(PY) -m pip install --quiet -e '.[bench]' --config-settings editable_mode=compat
	$(PY) bench/suite.py
	$(PY) bench/report.py
