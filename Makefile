# Two commands: `make demo` and `make test`. Both create .venv when missing and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup bench clean

setup:
	@VENV=$(VENV) ./scripts/setup-venv.sh

# The main job end to end on the bundled digits: shards; ACL on all data, and on 30% subsets chosen by random
# and by RCS, re-chosen every 3 epochs while training goes on (same epochs and seed; each round's subset is used
# from the epoch after its snapshot, so both subset runs are reproducible); SLF evaluation of all three (PGD-20;
# and the natural branch for scale); one table of what each cost and reached, with chance and the differences one
# seed cannot tell apart; a report with figures. (Digits are tiny: SLF batch 128, not 512.)
DEMO_EVAL = --protocol slf --epochs 10 --lr 0.1 --batch-size 128 --eps 0.1
DEMO_SUBSETS = --fraction 0.3 --select-every 3 --select-lag 1
demo: setup
	@$(PY) -m pipeline prepare digits --image-size 16 --out shards/digits-16
	@$(PY) -m pipeline train --config configs/demo-digits.toml --overwrite
	@$(PY) -m pipeline train --config configs/demo-digits.toml --out runs/demo-random --overwrite \
		--selector random $(DEMO_SUBSETS)
	@$(PY) -m pipeline train --config configs/demo-digits.toml --out runs/demo-rcs --overwrite \
		--selector rcs $(DEMO_SUBSETS)
	@for run in demo demo-random demo-rcs; do \
		$(PY) -m pipeline eval --data shards/digits-16 --checkpoint runs/$$run/checkpoints/last.pt $(DEMO_EVAL) || exit 1; \
		$(PY) -m pipeline eval --data shards/digits-16 --checkpoint runs/$$run/checkpoints/last.pt $(DEMO_EVAL) \
			--branch natural --attack clean || exit 1; \
	done
	@$(PY) -m pipeline report runs/demo runs/demo-random runs/demo-rcs --out runs/demo-report

test: setup
	@$(PY) -m pytest -q -p no:cacheprovider -n auto --dist worksteal

bench: setup
	@$(PY) benchmarks/bench_loader.py

clean:
	rm -rf $(VENV) shards runs .pytest_cache
