#!/usr/bin/env bash
# One node, NPROC processes (one pipeline stage each), started by torchrun.
#
#   NPROC=4 launch/torchrun_single_node.sh model=resnet18 data=cifar10 train.epochs=50
#
# Environment:
#   NPROC     processes = pipeline stages (default 4); sets pipeline.stages, do not pass it
#   RUN_DIR   run directory shared by every rank (default outputs/torchrun-<date>-<time>);
#             sets hydra.run.dir, do not pass it
#   TORCHRUN  the torchrun executable (default: sidpipe-torchrun, else torchrun, on PATH)
#   DRY_RUN=1 print the command instead of running it
# Every argument is passed through as a hydra override. pipeline.max_restarts=N is passed to
# torchrun as --max-restarts N: a died stage restarts every stage, which resume from the
# run's newest checkpoint. torchrun passes SIGUSR1 and SIGTERM on to the stages: they save a
# checkpoint and stop (preemption); continue with resume=auto.
set -euo pipefail

NPROC="${NPROC:-4}"
# Computed once here: a ${now:...} resolved by each rank could differ between ranks.
RUN_DIR="${RUN_DIR:-outputs/torchrun-$(date +%Y%m%d-%H%M%S)}"
# sidpipe-torchrun (installed with sidpipe): torchrun without its tracebacks after the
# stages' one-line reasons; plain torchrun where it is not installed
TORCHRUN="${TORCHRUN:-$(command -v sidpipe-torchrun || echo torchrun)}"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC must be a positive integer"
[[ "$RUN_DIR" =~ ^[^[:space:]\'\"]+$ ]] || die "RUN_DIR='$RUN_DIR' must not contain spaces or quotes"
max_restarts=0
for arg in "$@"; do
  case "$arg" in
    pipeline.max_restarts=*) max_restarts="${arg#*=}" ;;
    pipeline.stages=*) die "$arg: the stage count is NPROC (NPROC=$NPROC)" ;;
    hydra.run.dir=*) die "$arg: set RUN_DIR instead" ;;
    *) ;;
  esac
done
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "pipeline.max_restarts=$max_restarts must be a non-negative integer"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # per-stage threads: pipeline.threads=N
cmd=(
  "$TORCHRUN" --standalone --nproc-per-node "$NPROC"
  --max-restarts "$max_restarts" --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
  -m sidpipe.train "pipeline.stages=$NPROC" "hydra.run.dir=$RUN_DIR" "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "run dir: $RUN_DIR" >&2
exec "${cmd[@]}"
