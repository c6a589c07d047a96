#!/bin/bash
# Session 7, second call: descriptor epilogue (TMA level 2) and the swiglu backward epilogue in
# column halves. GPU tests with the descriptor path forced (kernels, autograd, CUDA graphs,
# torch.compile), then the per-GEMM A/B on three large configs.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
VMOE_TMA=only VMOE_PIN_CONFIG=1 timeout 200 python -m pytest -q -p no:cacheprovider -n 8 -rfE -x \
  tests/test_grouped_gemm.py tests/test_autograd.py tests/test_cuda_graph.py 2>&1 | tail -4
VMOE_TMA=only VMOE_PIN_CONFIG=1 timeout 100 python -m pytest -q -p no:cacheprovider -n 8 -rfE -x \
  tests/test_compile.py 2>&1 | tail -4
timeout 280 python results/probe_tma.py $OUT/tma_h100.csv "${1:-128x768-k8-relu2|32x1536.*swiglu|64x1024-k8-swiglu}" 2>&1 \
  | grep -v "Warn\|warn"
