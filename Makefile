# Set-up and the two jobs. `make simulate` and `make test` work on a fresh machine.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: simulate test setup test-tools clean

simulate: $(STAMP)
	$(BIN)/candor-sim

test: $(STAMP) test-tools
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

# Optional: libfaketime, for the multi-host tests of a skewed site clock (they skip, with
# the reason, without it). Installed from Debian's packages only where that is possible
# (root, apt-get); anything else, or a failure, leaves the machine as it was.
FAKETIME_LIB := /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
test-tools:
	@if [ ! -e $(FAKETIME_LIB) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq faketime) >/dev/null 2>&1 || \
		echo "libfaketime not installed: the clock-skew tests will skip"; fi

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
