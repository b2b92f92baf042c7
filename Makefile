# Two commands: `make demo` and `make test`. Both create .venv when missing and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup bench clean

setup:
	@VENV=$(VENV) ./scripts/setup-venv.sh

# The main job end to end on the bundled digits: shards, ACL pre-training, SLF evaluation under PGD-20 and the
# standard AutoAttack. (Digits are tiny: the SLF recipe's batch of 512 would leave 3 steps an epoch, so 128.)
demo: setup
	@$(PY) -m pipeline prepare digits --image-size 16 --out shards/digits-16
	@$(PY) -m pipeline stream shards/digits-16 --split train --batch-size 128
	@$(PY) -m pipeline train --config configs/demo-digits.toml --overwrite
	@$(PY) -m pipeline eval --data shards/digits-16 --checkpoint runs/demo/checkpoints/last.pt \
		--protocol slf --epochs 10 --lr 0.1 --batch-size 128 --eps 0.1 --attack pgd20,autoattack

test: setup
	@$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	@$(PY) benchmarks/bench_loader.py

clean:
	rm -rf $(VENV) shards runs .pytest_cache
