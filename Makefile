# casledger — the two commands a newcomer needs are `make run` and `make test`.
# Both create the virtual environment (.venv) and install what is needed on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TYPING := build/typing

.PHONY: run test unit integration e2e lint protos protos-check bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: start the service (and bridge) on the embedded SQLite default
run: $(STAMP)
	$(BIN)/casledger serve

## test: generated code up to date, lint + types, then every test
test: $(STAMP) protos-check lint
	$(BIN)/pytest

unit integration e2e: $(STAMP)
	$(BIN)/pytest tests/$@

## protos: regenerate service/api from protos/ (output is committed)
protos: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python protos/generate.py

## protos-check: fail when regenerating would change the committed code
protos-check: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python protos/generate.py --check

## lint: ruff, and mypy --strict over the hand-written code (generated code excluded)
lint: $(STAMP)
	$(BIN)/ruff check service http_bridge tests protos bench
	rm -rf $(TYPING) && mkdir -p $(TYPING)/casledger
	ln -s ../../../service $(TYPING)/casledger/service
	ln -s ../../../http_bridge $(TYPING)/casledger/http_bridge
	$(BIN)/mypy -p casledger.service -p casledger.http_bridge
	$(BIN)/mypy protos/generate.py

## bench: every benchmark (http vs etcd, grpc, scale); e.g. make bench BENCH_ARGS=--quick
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
