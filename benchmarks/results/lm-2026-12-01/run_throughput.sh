#!/usr/bin/env bash
# Throughput of the small preset, S=2: the SID pipeline (messages of B=32 windows: one update
# per 32 windows, as BP; and of 8) against every BP schedule (batch 32 in M=4 microbatches)
# and the single-process references; then SID again with bf16 beliefs on the wire.
# Steady state from each run's trace: 16 BP batches (SID: the same windows), 4 warm-up
# batches left out, median of 4 windows. Run from the repository root.
set -euo pipefail
OUT=${1:-/tmp/lm-bench}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=1
COMMON="experiment=lm_small data.root=$DATA bench.stages=[2] bench.batch_size=32 bench.microbatches=[4] bench.steps=16 bench.warmup=4 bench.windows=4"
$PY -m sidpipe.cli bench $COMMON hydra.run.dir=$OUT/fp32
$PY -m sidpipe.cli bench $COMMON "bench.schemes=[sid]" pipeline.belief_dtype=bf16 hydra.run.dir=$OUT/bf16
