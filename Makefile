# Setup, tests and demo. `make test` and `make demo` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact versions the suite last passed with: `make test`, `make demo` and CI install these, so a new release on
# the registries cannot break them. pyproject.toml keeps the ranges users install from; `make test-latest` runs the
# suite on the newest versions those ranges allow, and `make lock` writes them here once they pass.
CONSTRAINTS := constraints.txt
LATEST ?= .venv-latest
EXTRAS := dev,eval,cli,serve,wandb,mlflow

.PHONY: venv test demo test-latest lock clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first, pinned to the CPU build that lies on this machine's disk: installing the package first would
# let pip resolve torch itself and pull the multi-GB CUDA build. The stamp makes reruns free until pyproject.toml or
# the constraints change.
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/pip install -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q

# The sampling settings of the demo were measured on the trained clm-small (docs/generation.md).
demo: venv
	$(BIN)/perceiver train --preset clm-small
	$(BIN)/perceiver generate "The meaning of" --temperature 0.7 --top-p 0.9 --repetition-penalty 1.1

# The suite against the newest versions pyproject.toml allows, in a separate environment made afresh each time, so
# that drift is found on purpose and not by a failed submission.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install torch==2.13.0
	$(LATEST)/bin/pip install -e '.[$(EXTRAS)]'
	$(LATEST)/bin/python -m pytest -q

# After `make test-latest` passes: pin what it installed (this package itself left out).
lock:
	$(LATEST)/bin/pip freeze --exclude-editable | grep -v '^perceiver-cli' > $(CONSTRAINTS)

# Removes the environments and build leftovers; training runs are results, not leftovers, and stay.
clean:
	rm -rf $(VENV) $(LATEST) build dist .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
