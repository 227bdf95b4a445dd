# The README's two commands: `make demo` and `make test`. Everything they need is
# installed here: the venv, the package with its dev extras, and Debian's softhsm2.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOFTHSM_MODULE ?= /usr/lib/softhsm/libsofthsm2.so
# pytest-xdist processes for `make test`: most slow tests wait on subprocesses, brokers
# and servers, so two workers halve the suite on a 2-core machine (0 = in-process).
# pyproject's addopts give --dist loadfile: a test module runs whole, in order, on one
# worker (a module's last test may check what its others did). Not loadgroup: with
# pytest 9.2 and xdist 3.8 its xdist_group marks are silently ignored (xdist sets
# item._nodeid, which pytest 9.2 no longer reads; pytest-dev/pytest-xdist#1386).
PYTEST_WORKERS ?= 2

.PHONY: demo test lint typecheck pytest bench softhsm chromium postgres venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "KeyLedger needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

softhsm:
	@if [ -f $(SOFTHSM_MODULE) ] && command -v softhsm2-util >/dev/null && command -v openssl >/dev/null; then exit 0; fi; \
	echo "softhsm2 (or openssl, for the interop tests) is missing: installing with apt-get"; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	else echo "Cannot install softhsm2 (not root, no sudo): run 'apt-get install softhsm2' as root, then retry."; exit 1; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "Cannot install softhsm2: no apt-get here. Install SoftHSM2 2.6 with your package manager, then retry."; exit 1; fi; \
	{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 openssl >/dev/null; } || \
	  { echo "apt-get could not install softhsm2: install the Debian/Ubuntu package softhsm2, then retry."; exit 1; }

# Debian's chromium renders the HTML audit report in a test (headless, no network).
chromium:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then exit 0; fi; \
	echo "chromium (for the HTML report test) is missing: installing with apt-get"; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	else echo "Cannot install chromium (not root, no sudo): run 'apt-get install chromium' as root, then retry."; exit 1; fi; \
	{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "apt-get could not install chromium: install the Debian package chromium, then retry."; exit 1; }

# PostgreSQL for the test suite (127.0.0.1:5432, trust auth); start it if it is down.
postgres:
	@if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then \
	  echo "PostgreSQL is down: starting it"; \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -n1) main start || true; \
	fi

demo: softhsm venv
	@d=$$(mktemp -d "$${TMPDIR:-/tmp}/keyledger-demo.XXXXXX"); \
	$(BIN)/keyledger --data-dir "$$d" demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: softhsm chromium venv postgres
	$(BIN)/pytest -n $(PYTEST_WORKERS)

test: lint typecheck pytest

bench: softhsm venv postgres
	$(BIN)/python bench/encrypt.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/verify.py
	$(BIN)/python bench/forensics.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
