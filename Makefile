# The two commands of the README's quick start: `make run` and `make test`.
# Everything the project needs is installed from here: a venv in .venv and, for the
# tests, the real torrent makers (mktorrent, transmission-create) from Debian.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench tools
run: $(VENV)/.run-deps
	$(BIN)/pieced run

test: $(VENV)/.test-deps tools lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

# mypy cannot follow setuptools' editable finder, so it reads the packages through a
# tree of symlinks laid out as they install (pieced/storage -> storage, ...).
lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	@mkdir -p .typecheck/pieced && for p in daemon protocol storage peer config; do \
	  ln -sfn ../../$$p .typecheck/pieced/$$p; done
	$(BIN)/mypy

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: pyproject.toml $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.run-deps

tools:
	@command -v mktorrent >/dev/null && command -v transmission-create >/dev/null \
	  && command -v systemd-analyze >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO apt-get install -y -qq mktorrent transmission-cli systemd >/dev/null; }

bench: $(VENV)/.test-deps
	$(BIN)/python bench/recheck.py
