#!/usr/bin/env bash
# Timing measurements of lm-vocab-measured-2026-12-03, each in its own `$QUIET` call (on the
# shared 2-core machine /tmp/quiet pauses the other work for the duration of one command).
# Run from the repository root: bash benchmarks/results/lm-vocab-measured-2026-12-03/run_timing.sh PART
#   PART = split | bench8192 | bench256 | bench2048 | topk [V] | sim8192 | sim256 | deep8192 | wide8192
#          | sim8modules256 | sim8modules8192 (8 layers, one module each: the S = 8 simulation)
set -euo pipefail
HERE=benchmarks/results/lm-vocab-measured-2026-12-03
PY=${PY:-/work/main/.venv/bin/python}
QUIET=${QUIET:-/tmp/quiet}
export OMP_NUM_THREADS=1
# glibc returns every freed block above 128 KB to the OS and faults it in again on the next
# allocation; at V = 8192 that made a training step 2.6x slower (mostly kernel time). Keep
# freed memory in the process instead (same for every scheme).
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
BENCH="experiment=lm_small pipeline.cpu_affinity=true bench.stages=[2] bench.batch_size=32 bench.microbatches=[4] bench.steps=4 bench.warmup=1 bench.windows=2"
SIM="bench.mode=simulate experiment=lm_small pipeline.cpu_affinity=true bench.stages=[2,4,8] bench.batch_size=32 bench.microbatches=[1,4,16]"
tok() { if [[ $1 == 256 ]]; then echo data.tokenizer=bytes; else echo "data.tokenizer=bpe data.vocab_size=$1"; fi; }
case $1 in
  split) $QUIET $PY benchmarks/lm_vocab.py --out $HERE/split --stages 2 --topk 32 --steps 5 --warmup 2 ;;
  bench*) v=${1#bench}; $QUIET $PY -m sidpipe.cli bench $BENCH $(tok $v) hydra.run.dir=/tmp/lmm/b$v bench.out_dir=$HERE/bench-v$v ;;
  topk) for v in ${2:-8192}; do $QUIET $PY -m sidpipe.cli bench $BENCH $(tok $v) "bench.schemes=[sid]" pipeline.belief_topk=32 hydra.run.dir=/tmp/lmm/t$v bench.out_dir=$HERE/bench-v$v-topk32; done ;;
  sim8modules*) v=${1#sim8modules}; $QUIET $PY -m sidpipe.cli bench $SIM $(tok $v) model.depth=8 model.blocks=8 hydra.run.dir=/tmp/lmm/s8m$v bench.out_dir=$HERE/simulated-v$v-8modules ;;
  sim*) v=${1#sim}; $QUIET $PY -m sidpipe.cli bench $SIM $(tok $v) hydra.run.dir=/tmp/lmm/s$v bench.out_dir=$HERE/simulated-v$v ;;
  wide*) v=${1#wide}; $QUIET $PY -m sidpipe.cli bench $BENCH $(tok $v) model.width=256 hydra.run.dir=/tmp/lmm/w$v bench.out_dir=$HERE/bench-v$v-width256 ;;
  deep*) v=${1#deep}; $QUIET $PY -m sidpipe.cli bench $BENCH $(tok $v) model.depth=8 model.blocks=4 hydra.run.dir=/tmp/lmm/d$v bench.out_dir=$HERE/bench-v$v-depth8 ;;
esac
