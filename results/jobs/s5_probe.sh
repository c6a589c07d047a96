#!/bin/bash
# Session 5, first GPU call: the direct launch path's tests and host-time probe, a short
# reduce-overhead training run against eager, then the layer-scope benchmark (all configs).
export PYTHONPATH=. PYTHONUNBUFFERED=1 TQDM_DISABLE=1 VMOE_PIN_CONFIG=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -x tests/test_launch.py 2>&1 | tail -5
python results/probe_launch.py 2>&1 | tee $OUT/probe_launch.log | head -60
for mode in reduce-overhead none; do
  flag=$([ $mode = none ] || echo "--compile $mode")
  timeout 200 python -m vmoe.train --config var5 --seed 0 --total-tokens 8192000 $flag \
    --out /tmp/runs_$mode 2>&1 | grep -v "^$" | tail -4
  cp /tmp/runs_$mode/var5_s0/log.csv $OUT/smoke_$mode.csv 2>/dev/null
done
timeout 230 python -m vmoe.bench --scope layer --configs all --out $OUT/layer.csv 2>&1 | tail -25
