# ASPEN serve — the two commands a user needs: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install serve demo test wheel-smoke test-slow soak bench lint clean proto

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Main job: the demo model (built on first use) served by ASPEN.
serve: install
	$(BIN)/aspen serve --model demo

demo: install
	$(BIN)/aspen demo

## The whole fast suite (what CI runs first).
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## The wheel as a user installs it: built from this checkout, installed without extras into a fresh virtualenv,
## every documented command run from outside the source tree (CI runs it after `make test`).
wheel-smoke: install
	PY="$(PY)" BUILD_PY="$(BIN)/python" TORCH_SPEC="$(TORCH_SPEC)" bash .ci/wheel_smoke.sh

## Long checks marked `slow`.
test-slow soak: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check aspen engine clients tests benchmarks

## Regenerate the gRPC stubs (clients/aspen/v1) from the wire contract, proto/aspen/v1/aspen.proto.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iclients=proto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/aspen/v1/aspen.proto

clean:
	rm -rf $(VENV) build *.egg-info
