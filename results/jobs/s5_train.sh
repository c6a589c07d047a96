#!/bin/bash
# Session 5, training batch (issue 14) on one machine of 4 GPUs: 7 configs x 3 seeds of 16.8M tokens
# under torch.compile(mode="reduce-overhead"), round-robin over GPUs 0-2 in order of seed (seeds 0
# and 1 of every config first), one run at a time per GPU; GPU 3 runs the GPU test suite.
export PYTHONPATH=. PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=index,name --format=csv,noheader
RUNS=()
for seed in 0 1 2; do
  for c in "uniform" "var5" "var23" "uniform_realised --expert-width 610" \
           "uniform_realised --expert-width 464" "var5_null" "var5_cl"; do
    RUNS+=("--config $c --seed $seed")
  done
done
queue() {  # GPU $1 takes runs $1, $1+3, ...
  for ((i = $1; i < ${#RUNS[@]}; i += 3)); do
    CUDA_VISIBLE_DEVICES=$1 python -m vmoe.train ${RUNS[$i]} --compile reduce-overhead --total-tokens 16777216 \
      --out runs > logs/gpu$1_$i.log 2>&1
    echo "gpu$1 run $i (${RUNS[$i]}) rc=$? at ${SECONDS}s"
  done
}
mkdir -p logs runs
for g in 0 1 2; do queue $g & done
CUDA_VISIBLE_DEVICES=3 VMOE_PIN_CONFIG=1 timeout 420 python -m pytest -q -n 8 -p no:cacheprovider \
  -rfE tests/ > logs/gpu_suite.log 2>&1 &
SUITE=$!
sleep 540
wait $SUITE; tail -25 logs/gpu_suite.log
python -m vmoe.train --collect --out runs --results $OUT
tar czf $OUT/logs.tgz logs runs/*/log.csv
