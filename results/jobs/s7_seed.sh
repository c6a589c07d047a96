#!/bin/bash
# Session 7: no regression at the original (small) configs. The seed sweep at expert scope,
# eager and CUDA-graph replay, with the descriptor path off and then on (auto), in one call.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
for mode in off auto; do
  VMOE_TMA=$mode timeout 270 python -m vmoe.bench --configs seed --scope expert \
    --providers vmoe vmoe_graph --out $OUT/seed_$mode.csv 2>&1 | grep -v "Warn\|warn" | grep -v "^device"
done
