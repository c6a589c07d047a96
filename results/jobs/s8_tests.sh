#!/bin/bash
# Session 8: the whole GPU suite as users run it (VMOE_TMA=auto, the default) at the code that
# ships the warp-specialized kernel; $1 = "only" instead runs the kernel suites with the
# descriptor path forced everywhere it is eligible.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
git log -1 --format=%h
if [ "${1:-auto}" = only ]; then
  VMOE_TMA=only VMOE_PIN_CONFIG=1 timeout ${2:-300} python -m pytest -q -p no:cacheprovider -n 12 -rfE \
    tests/test_grouped_gemm.py tests/test_autograd.py tests/test_cuda_graph.py tests/test_compile.py \
    tests/test_routing.py 2>&1 | grep -E "passed|failed|FAILED|ERROR" | tail -12
else
  VMOE_PIN_CONFIG=1 timeout ${2:-560} python -m pytest -q -p no:cacheprovider -n 12 -rfE tests/ \
    --ignore=tests/test_parallel_gpu.py --durations=15 2>&1 | grep -E "passed|failed|FAILED|ERROR|^[0-9.]+s " | tail -30
fi
