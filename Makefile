# Two entry points for a fresh machine: `make dev` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)

.PHONY: dev test lint fmt install redis-server browser bench bench-install bench-client bench-quick

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

# The console's browser tests (tests/integration/test_console_browser.py) drive Debian's
# headless chromium through chromium-driver; nothing downloads a browser at test time.
browser:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium chromium-driver; fi; }

dev: install
	$(VENV)/bin/twistd --nodaemon --pidfile= chatgateway --dev

# The checks first (make lint), then every test.
test: install redis-server browser lint
	$(PY) -m pytest -q tests

# The formatter's and the linter's checks (ruff.toml), then the types (mypy.ini).
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# For developers: format, and fix what the linter can fix safely.
fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The benchmark suite (not a test): about 45 minutes on 2 CPUs; see bench/README.md.
BENCH_CLIENT := bench/out/fanout_client

bench-install: install redis-server
	$(PY) -m pip install --quiet -e '.[bench]' --config-settings editable_mode=compat

# The C load client (bench/suite.py also builds it when missing or older than its source).
$(BENCH_CLIENT): bench/fanout_client.c
	mkdir -p bench/out
	gcc -O2 -Wall -o $@ $<

bench-client: $(BENCH_CLIENT)

bench: bench-install
	$(PY) bench/suite.py
	$(PY) bench/report.py

bench-quick: bench-install
	$(PY) bench/suite.py --quick --systems reference,gateway
	$(PY) bench/report.py --no-plots
