# Two commands: `make demo` and `make test`. Both create .venv when missing and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup bench clean

setup:
	@VENV=$(VENV) ./scripts/setup-venv.sh

demo: setup
	@$(PY) -m pipeline prepare digits --out shards/digits
	@$(PY) -m pipeline verify shards/digits
	@$(PY) -m pipeline stream shards/digits --split train --batch-size 128

test: setup
	@$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	@$(PY) benchmarks/bench_loader.py

clean:
	rm -rf $(VENV) shards .pytest_cache
