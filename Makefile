# Thin wrappers: ./dev is the entry point a fresh machine needs (no make required).
.PHONY: demo test test-deep up down lock protos check-protos lint types buf bench trace-demo fuzz chaos

demo:
	./dev demo
test:
	./dev test
test-deep:
	TALLY_DEEP=1 ./dev test
up:
	./dev up
down:
	./dev down
lock:
	scripts/lock.sh
protos:
	scripts/gen_protos.sh
check-protos:
	scripts/check_protos.sh
lint:
	.venv/bin/ruff check .
types:
	.venv/bin/mypy libs/tally/kit libs/tally/sdk libs/tally/cli libs/tally/rating libs/tally/limits services bench
buf:
	npx --yes @bufbuild/buf lint
bench:
	.venv/bin/python -m bench.baseline

trace-demo:
	./dev setup && .venv/bin/tally trace-demo

# Fuzz every RPC from the proto descriptors: a random seed (printed for replay) for a time
# budget; CI runs the same test with a fixed seed and a bounded count.
FUZZ_SECONDS ?= 300
fuzz:
	TALLY_FUZZ_SEED=$${TALLY_FUZZ_SEED:-random} TALLY_FUZZ_SECONDS=$(FUZZ_SECONDS) \
	  .venv/bin/python -m pytest tests/fuzz -q -s -p no:cacheprovider

# Faults under load with invariants checked after each (tests/chaos); CI runs the short form.
CHAOS_FAULT_SECONDS ?= 10
chaos:
	TALLY_CHAOS_FAULT_SECONDS=$(CHAOS_FAULT_SECONDS) \
	  .venv/bin/python -m pytest tests/chaos -q -s -p no:cacheprovider
