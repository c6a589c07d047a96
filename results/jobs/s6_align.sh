#!/bin/bash
# Session 6, last H100 call: the ALIGN hint (largest power of two up to 16 dividing every width)
# against the bool ALIGNED flag it replaced, in one call. .before/ holds the package as committed
# before the change (git archive HEAD vmoe); the width-cost probe runs on both, then the GPU tests
# of the kernels it touches, then compiled training runs at widths 610 and 608.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name --format=csv,noheader
for v in .before .; do
  echo "== vmoe from $v"
  PYTHONPATH=$v:. timeout 90 python results/probe_width_cost.py $OUT/width_cost_$( [ $v = . ] && echo after || echo before ).csv \
    "608|610|616|768x|p=" 2>&1 | grep -v "Warn\|warn"
done
export PYTHONPATH=.
VMOE_PIN_CONFIG=1 timeout 170 python -m pytest -q -p no:cacheprovider -n 8 -rfE tests/test_grouped_gemm.py \
  tests/test_autograd.py 2>&1 | tail -4
for w in 610 608; do  # tokens/s of the interval from step 250 to 500 (after compilation)
  timeout 80 python -m vmoe.train --config uniform_realised --expert-width $w --seed 0 --compile reduce-overhead \
    --total-tokens 8388608 --out /tmp/align 2>&1 | grep "step 500\|Error"
done
