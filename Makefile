# Setup, tests and demo. `make test` and `make demo` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first, pinned to the CPU build that lies on this machine's disk: installing the package first would
# let pip resolve torch itself and pull the multi-GB CUDA build. The stamp makes reruns free until pyproject.toml
# changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,eval]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q

# The sampling settings of the demo were measured on the trained clm-small (README, "Generating").
demo: venv
	$(BIN)/perceiver train --preset clm-small
	$(BIN)/perceiver generate "The meaning of" --temperature 0.7 --top-p 0.9 --repetition-penalty 1.1

# Removes the environment and build leftovers; training runs are results, not leftovers, and stay.
clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
