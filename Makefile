# `make test` and `make serve` do all set-up on a fresh machine (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make test` installs the versions CI last passed with; `make test-latest` empties PINS to take today's newest.
PINS ?= -c constraints.txt
TORCH_CPU := torch==2.13.0

# NOTE: the repository root is the package `baleen`, and its folders (kernels/, model/, api/, ...) share names
# with PyPI packages (transformers imports PyPI's `kernels`). Python puts the current directory first on sys.path
# for `python -m ...`; PYTHONSAFEPATH (python -P) stops that for every Python this Makefile starts and their
# children, so `baleen.kernels` is only ever reached as `baleen.kernels`.
export PYTHONSAFEPATH := 1

.PHONY: test test-latest serve lint typecheck pytest install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The CPU torch build comes from local disk in seconds; a bare `torch` requirement would pull CUDA.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default torch build"; \
	else \
		$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q $(PINS) -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy cannot see the package through the editable finder: give it a `baleen` folder that is this checkout.
typecheck: $(STAMP)
	@mkdir -p .mypy_root && ln -sfn "$(CURDIR)" .mypy_root/baleen
	MYPYPATH=.mypy_root $(BIN)/mypy -p baleen

pytest: $(STAMP)
	$(BIN)/python -P -m pytest tests

test: lint typecheck pytest

# The same checks in a separate venv with the newest release of every dependency (no pins), upgraded on every
# run: green here is what allows moving the pins in constraints.txt.
test-latest:
	@test -x .venv-latest/bin/python || { $(PY) -m venv .venv-latest && .venv-latest/bin/pip install -q --upgrade pip; }
	@if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1); then \
		.venv-latest/bin/python -c "import torch" 2>/dev/null || .venv-latest/bin/pip install -q $(TORCH_CPU); \
	fi
	@# NOTE: keep the installed torch: an eager upgrade would swap the CPU build for a multi-GB CUDA one.
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[test]" \
		$$(.venv-latest/bin/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' 2>/dev/null)
	@touch .venv-latest/.installed
	$(MAKE) test VENV=.venv-latest PINS=

serve: $(STAMP)
	$(BIN)/baleen serve $(ARGS)

bench: $(STAMP)
	$(BIN)/python loadtest/make_bench.py

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info
