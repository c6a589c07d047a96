#!/bin/bash
# Session 8: the forward's parts at the large configs (vmoe's launches and the dense stand-in's),
# one run on one card.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${1:-300} python results/probe_forward.py $OUT/forward_parts_h100.csv "${2:-.}" 2>&1 | grep -v "Warn\|warn" | tail -80
