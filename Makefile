# Thin wrappers: ./dev is the entry point a fresh machine needs (no make required).
.PHONY: demo test test-deep up down lock protos check-protos lint types buf bench trace-demo

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
