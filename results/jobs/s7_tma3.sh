#!/bin/bash
# Session 7, third kernel call: the warp-specialized kernel. GPU tests with the descriptor path
# forced ("only": the warp-specialized kernel for every eligible ragged-to-sorted GEMM), then the
# per-GEMM comparison of "off" (pointer kernels) and "auto" (what users get) on three large configs.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
VMOE_TMA=only VMOE_PIN_CONFIG=1 timeout 200 python -m pytest -q -p no:cacheprovider -n 8 -rfE -x \
  tests/test_grouped_gemm.py tests/test_autograd.py tests/test_cuda_graph.py tests/test_compile.py \
  tests/test_routing.py 2>&1 | tail -3
timeout 330 python results/probe_tma.py $OUT/gemms_h100.csv \
  "${1:-128x768-k8-relu2|32x1536.*swiglu|64x1024-k8-swiglu}" off auto 2>&1 | grep -v "Warn\|warn"
