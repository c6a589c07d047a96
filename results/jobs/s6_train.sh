#!/bin/bash
# Session 6, training batch (issue 14) on ONE H200, one run at a time, over as many calls as it
# takes: 7 configs x 3 seeds of 16.8M tokens under torch.compile(mode="reduce-overhead"), seeds 0
# and 1 of every config first. Usage: s6_train.sh SECONDS. A run still going when SECONDS are
# nearly spent stops with a checkpoint (--max-seconds) and the next call resumes it; finished runs
# are skipped. Runs live in runs_s6/ (ignored), which the warm machine keeps between calls.
export PYTHONPATH=. PYTHONUNBUFFERED=1 TQDM_DISABLE=1
BUDGET=${1:-570}
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p runs_s6 logs_s6
for seed in 0 1 2; do
  for c in "var5" "uniform" "var23" "uniform_realised --expert-width 610" \
           "uniform_realised --expert-width 464" "var5_null" "var5_cl"; do
    set -- $c; tag="$1$([ -n "$3" ] && echo "_w$3")_s$seed"
    [ -f runs_s6/$tag.done ] && continue
    left=$((BUDGET - SECONDS))
    [ $left -lt 90 ] && { echo "out of time before $tag"; break 2; }
    python -m vmoe.train --config $c --seed $seed --compile reduce-overhead --total-tokens 16777216 \
      --out runs_s6 --resume --max-seconds $((left - 45)) >> logs_s6/$tag.log 2>&1
    rc=$?
    grep -q "step 1024/1024" logs_s6/$tag.log && touch runs_s6/$tag.done
    echo "$tag rc=$rc $([ -f runs_s6/$tag.done ] && echo done || echo stopped) at ${SECONDS}s"
  done
done
ls runs_s6/*.done | wc -l
tar czf $OUT/logs.tgz logs_s6 runs_s6/*/log.csv
