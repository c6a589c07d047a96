#!/bin/bash
# Session 6, third H200 call: the batch's missing run (uniform_realised_w610 seed 1, whose resume
# failed; fixed) from scratch, beside a re-run of uniform seed 0 to place this machine's tokens/s
# against the batch's; the width-cost probe (issue 14); the per-kernel profile after the scatter rewrite
# (issue 12).
export PYTHONPATH=. PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name --format=csv,noheader
for c in "uniform --seed 0 --out /tmp/ref" "uniform_realised --expert-width 610 --seed 1 --out runs_s6"; do
  python -m vmoe.train --config $c --compile reduce-overhead --total-tokens 16777216 2>&1 | grep "step 1024\|Error"
done
# A compiled run resumed from its checkpoint (what failed in the batch), 30 + 30 steps:
for r in "" "--resume"; do
  python -m vmoe.train --config var5 --seed 9 --compile reduce-overhead --total-tokens 16777216 \
    --max-steps 30 --out /tmp/resume $r 2>&1 | grep "stopped\|Error" || echo "resume check: no output"
done
cp runs_s6/uniform_realised_w610_s1/log.csv $OUT/w610_s1.csv; cp /tmp/ref/uniform_s0/log.csv $OUT/ref_uniform_s0.csv
timeout 150 python results/probe_width_cost.py $OUT/width_cost.csv 2>&1
timeout 100 python results/probe_kernels.py --steps 10 > $OUT/probe_kernels.log 2>&1; head -50 $OUT/probe_kernels.log
