# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs learnedopt, trains two small MLPs with the learned optimizers beside tuned baselines
#   make test   creates .venv, installs learnedopt with its test tools, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (it lies on this project's machines' local disk; an unpinned torch may pull a CUDA build).
TORCH  ?= torch==2.13.0

.PHONY: demo test bench-cpu env clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,data,plots,bench]"
	touch $@

env: $(VENV)/.installed

demo: env
	$(BIN)/learnedopt demo

test: env
	$(BIN)/python -m pytest -q

bench-cpu: env
	$(BIN)/python benchmarks/cpu_step.py

clean:
	rm -rf $(VENV) build *.egg-info
