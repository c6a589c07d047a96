#!/bin/bash
# Session 6, H100 call (issue 12's targets are H100 numbers): the layer scope of the 8 original
# configs (eager, CUDA-graph replay, the grouped_mm layer pipeline, dense) and the two relu2 large
# configs at both scopes (layer <= 1.05x expert-only), with the direct launch path and the new
# scatter; the width-cost probe (issue 14); the reduce-overhead tests, resumed-run case included.
export PYTHONPATH=. PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 250 python -m vmoe.bench --scope layer --configs seed --providers vmoe vmoe_graph grouped_mm dense \
  --out $OUT/h100_layer.csv 2>&1 | grep -v "^$" | tail -20
timeout 150 python -m vmoe.bench --scope both --configs large --match "large-(128x768|32x1536).*relu2" \
  --providers vmoe vmoe_graph grouped_mm dense --out $OUT/h100_layer.csv 2>&1 | grep -v "^$" | tail -12
timeout 70 python results/probe_width_cost.py $OUT/width_cost_h100.csv 2>&1
timeout 90 python -m pytest -q -p no:cacheprovider -rfE tests/test_compile.py -k reduce_overhead 2>&1 | tail -3
