#!/bin/bash
# Session 5, second GPU call: the direct launch path (tests, host-time probe, layer-scope
# benchmark of the seed configs), the per-kernel profile, then the whole GPU suite.
export PYTHONPATH=. PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -m pytest -q tests/test_launch.py 2>&1 | tail -3
python results/probe_launch.py > $OUT/probe_launch.log 2>&1; head -32 $OUT/probe_launch.log
timeout 120 python results/probe_kernels.py --steps 10 > $OUT/probe_kernels.log 2>&1
timeout 150 python -m vmoe.bench --scope layer --configs seed --providers vmoe vmoe_graph grouped_mm dense \
  --out $OUT/layer_direct.csv 2>&1 | grep -c " ok\| -$"
VMOE_PIN_CONFIG=1 timeout 300 python -m pytest -q -n 12 -p no:cacheprovider tests/ -x \
  > $OUT/gpu_suite.log 2>&1; tail -15 $OUT/gpu_suite.log
