#!/bin/bash
# Session 7, first call: the descriptor (TMA) path. GPU tests of the kernels with the path forced
# on (pinned configs: the same block shapes as the pointer path's first), then the per-GEMM A/B
# on two large configs, each mode autotuned over its own configs.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
VMOE_TMA=only VMOE_PIN_CONFIG=1 timeout 200 python -m pytest -q -p no:cacheprovider -n 8 -rfE -x \
  tests/test_grouped_gemm.py tests/test_autograd.py 2>&1 | tail -6
timeout 330 python results/probe_tma.py $OUT/tma_h100.csv "${1:-128x768-k8-relu2|32x1536.*swiglu}" 2>&1 \
  | grep -v "Warn\|warn"
