#!/bin/bash
# Session 7: the expert-scope sweep with the descriptor path (VMOE_TMA=auto, the default),
# vmoe against grouped_mm and the dense stand-in in one run; $1 picks the configs.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${2:-560} python -m vmoe.bench --configs ${3:-large} --match "${1:-.}" --scope expert \
  --providers vmoe grouped_mm dense --out $OUT/sweep_${3:-large}.csv 2>&1 | grep -v "Warn\|warn"
