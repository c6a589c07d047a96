#!/bin/bash
# Session 8: the kernel suites with the descriptor path forced ("only") at the shipped code, then
# the per-GEMM breakdown (auto, what users get) of the two large relu2 configs that miss the
# expert-scope targets in the session-8 sweep.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
bash results/jobs/s8_tests.sh only 270
timeout 260 python results/probe_tma.py $OUT/gemms_relu2_var_h100.csv \
  "32x1536.*relu2|16x2048.*relu2" auto 2>&1 | grep -v "Warn\|warn"
