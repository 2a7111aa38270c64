# Two commands work on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing; torch goes in first, pinned, because
# a CPU build of exactly that release lies on the build machines' disk.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.libpipe-installed
TORCH  := torch==2.13.0

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,sim]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/libpipe demo

bench: $(STAMP)
	for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check libpipe tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
