#!/usr/bin/env bash
# bf16 beliefs on the wire: the small preset (K=4, seed 0) as a 2-stage SID pipeline with
# pipeline.belief_dtype=bf16, against sid-k4-s0 of run_quality.sh (fp32 beliefs; the fp32
# pipeline computes exactly the single-process parameters, tests/test_lm.py).
set -euo pipefail
OUT=${1:-/tmp/lm-quality}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=1
$PY -m sidpipe.cli train experiment=lm_small data.root=$DATA pipeline.stages=2 pipeline.threads=1 \
  pipeline.belief_dtype=bf16 model.blocks=4 seed=0 train.eval_every_steps=250 progress=false \
  hydra.run.dir=$OUT/sid-k4-s0-bf16wire
