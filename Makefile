# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv and run the offline quickstart (3 methods, digits, corrupted inputs)
#   make test         set up .venv and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sbtrainer-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test quickstart lint clean

setup: $(STAMP)

# torch and torchvision first, pinned: pip takes them from local disk here, and the
# package's open range (torch>=2.4) is then already satisfied, so pip never fetches a newer torch.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Two workers, one test file each at a time (module fixtures stay in one process); the slowest files start first
# (tests/conftest.py). `$(PY) -m pytest -q tests` runs the same suite in one process.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

quickstart: $(STAMP)
	$(PY) recipes/quickstart.py

lint: $(STAMP)
	$(VENV)/bin/ruff check sbtrainer recipes tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
