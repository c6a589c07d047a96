#!/bin/bash
# Session 7: the GPU suite after the descriptor path. First the kernel tests with the path forced
# on everywhere it is eligible ("only"), then the whole suite as users run it ("auto").
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
VMOE_TMA=only VMOE_PIN_CONFIG=1 timeout 230 python -m pytest -q -p no:cacheprovider -n 8 -rfE \
  tests/test_grouped_gemm.py tests/test_autograd.py tests/test_cuda_graph.py tests/test_compile.py \
  tests/test_routing.py 2>&1 | grep -E "passed|failed|FAILED|ERROR" | tail -12
VMOE_PIN_CONFIG=1 timeout 330 python -m pytest -q -p no:cacheprovider -n 8 -rfE tests/ \
  --ignore=tests/test_parallel_gpu.py 2>&1 | grep -E "passed|failed|FAILED|ERROR" | tail -12
