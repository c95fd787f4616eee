# Set-up and the two jobs. `make simulate` and `make test` work on a fresh machine.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: simulate test setup clean

simulate: $(STAMP)
	$(BIN)/candor-sim

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

setup: $(STAMP)

# torch is pinned to the CPU wheel on this disk first: a looser requirement would pull
# a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
