#!/usr/bin/env bash
# Beyond the early regime: the small preset trained 4x longer (2000 steps = 8.2M tokens,
# ~1.8 epochs), SID K=4 and BP, seed 0, both at once (one core each), evaluated at steps
# 1000 and 2000. Run from the repository root.
set -euo pipefail
OUT=${1:-/tmp/lm-long}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
COMMON="experiment=lm_small data.root=$DATA pipeline.stages=1 pipeline.threads=1 train.max_steps=2000 train.epochs=2 train.eval_every_steps=1000 train.eval_every_epoch=false progress=false seed=0"
export OMP_NUM_THREADS=1
$PY -m sidpipe.cli train $COMMON model.blocks=4 hydra.run.dir=$OUT/sid-k4-s0 > $OUT-sid.log 2>&1 &
$PY -m sidpipe.cli train $COMMON method=bp pipeline.microbatches=1 hydra.run.dir=$OUT/bp-s0 > $OUT-bp.log 2>&1 &
wait
