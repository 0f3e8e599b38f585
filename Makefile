# Two targets a user needs: `make run` and `make test`.  Both build their
# own virtual environment in .venv from pyproject.toml.  `make bench`
# compares the daemon with Postfix and aiosmtpd (see README, Performance).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

# The manual pages are installed too (share/man): a new one needs a reinstall.
$(STAMP): pyproject.toml $(wildcard man/*.[0-9])
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast,bench]'
	touch $@

# deliver runs beside smtpd; Ctrl-C stops smtpd, and the trap stops deliver.
run: $(STAMP)
	$(BIN)/deliver & deliver=$$!; \
	trap 'kill $$deliver 2>/dev/null; wait $$deliver' EXIT INT TERM; \
	$(BIN)/smtpd -d smtpsrvr local,smtp

lint: $(STAMP)
	$(BIN)/ruff check src tests bench build_backend
	$(BIN)/ruff format --check src tests bench build_backend
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
