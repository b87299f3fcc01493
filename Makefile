# The two commands of the README's quick start: `make run` and `make test`.
# Everything the project needs is installed from here: a venv in .venv and, for the
# tests, the real torrent makers (mktorrent, transmission-create), a real tracker
# (opentracker) and the browser the status page is tested in (chromium) from Debian.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench bench-all tools screenshot
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

# LIBURING_CACHE: the liburing package keeps a cache of its names beside its files,
# made here at the install, so that a daemon that may not write there reads it.
LIBURING_CACHE := $(BIN)/python -c "from pieced.storage.uring import liburing; liburing()" \
	|| echo "liburing does not load here: the uring backend is not available"

$(VENV)/.run-deps: pyproject.toml $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	$(LIBURING_CACHE)
	touch $@

$(VENV)/.test-deps: pyproject.toml $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[test]'
	$(LIBURING_CACHE)
	touch $@ $(VENV)/.run-deps

tools:
	@command -v mktorrent >/dev/null && command -v transmission-create >/dev/null \
	  && command -v systemd-analyze >/dev/null && command -v chromium >/dev/null \
	  && command -v chattr >/dev/null && command -v mkfs.btrfs >/dev/null \
	  && command -v opentracker >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq mktorrent transmission-cli systemd chromium e2fsprogs \
	      btrfs-progs opentracker >/dev/null; }

# docs/status-page.png: the status page mid-download, as the browser test sees it.
screenshot: $(VENV)/.test-deps tools
	STATUS_PAGE_SCREENSHOT=docs/status-page.png $(BIN)/pytest -q tests/test_page.py \
	  -k test_page_follows_a_download

bench: $(VENV)/.test-deps
	$(BIN)/python bench/recheck.py
	$(BIN)/python bench/recheck.py --cold

# Every benchmark of BENCHMARKS.md in one run (about 10 minutes): JSON in bench/out/all/.
bench-all: $(VENV)/.test-deps tools
	bash bench/all.sh
