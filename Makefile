# The README's two commands: `make main` (set up, then the main sweep) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP ?= model.norm=pre,post depth=6,24,48

.PHONY: setup main test test-fast bench clean

setup:
	bash scripts/setup.sh

main: setup
	$(PY) run.py -m $(SWEEP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf multirun outputs wandb .pytest_cache
