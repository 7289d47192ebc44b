#!/usr/bin/env bash
# SID vs BP on the small preset at equal training tokens (500 steps x 32 windows x 128 bytes
# = 2.05M tokens): SID with K=4 and K=2 modules, BP (one network; model.blocks only groups
# its layers, BP trains them end to end with the last head), seeds 0 and 1. Single process
# (pipeline.stages=1: the SID pipeline computes the same parameters, tests/test_lm.py).
# Run from the repository root: bash benchmarks/results/lm-2026-12-01/run_quality.sh OUT
set -euo pipefail
OUT=${1:-/tmp/lm-quality}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
COMMON="experiment=lm_small data.root=$DATA pipeline.stages=1 pipeline.threads=1 train.eval_every_steps=250 progress=false"
export OMP_NUM_THREADS=1
for seed in 0 1; do
  for k in 4 2; do
    $PY -m sidpipe.cli train $COMMON seed=$seed model.blocks=$k hydra.run.dir=$OUT/sid-k$k-s$seed
  done
  $PY -m sidpipe.cli train $COMMON seed=$seed method=bp pipeline.microbatches=1 hydra.run.dir=$OUT/bp-s$seed
done
