#!/bin/bash
# Session 6, first GPU call: the reduce-overhead fix of session 5 (cache entries keep no tensors)
# on a GPU, and one compiled training run of the batch's schedule, timed, to size the batch.
export PYTHONPATH=. PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -m pytest -q -p no:cacheprovider -rfE tests/test_compile.py tests/test_launch.py 2>&1 | tail -8
for seed in 0 1; do  # the second run finds inductor's cache warm, as later runs of a batch will
  /usr/bin/time -f "run seed $seed: %e s wall" python -m vmoe.train --config var5 --seed $seed \
    --compile reduce-overhead --total-tokens 16777216 --out /tmp/runs 2>&1 | grep -v "^$" | tail -3
done
cp /tmp/runs/var5_s0/log.csv $OUT/var5_s0.csv
