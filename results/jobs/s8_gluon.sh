#!/bin/bash
# Session 8: the Gluon warp-specialized up_proj probe (cp.async row-gather producer, wgmma
# consumer) against the same kernel with TMA rows, vmoe's up_proj and cuBLAS, in one run.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${1:-240} python results/probe_gluon.py $OUT/gluon_up_proj_h100.csv 2>&1 | grep -v "Warn\|warn" | tail -30
