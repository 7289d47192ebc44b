#!/usr/bin/env bash
# One node, NPROC processes (one pipeline stage each), started by torchrun.
#
#   NPROC=4 launch/torchrun_single_node.sh model=resnet18 data=cifar10 train.epochs=50
#
# Environment:
#   NPROC     processes = pipeline stages (default 4); sets pipeline.stages, do not pass it
#   RUN_DIR   run directory shared by every rank (default outputs/torchrun-<date>-<time>);
#             sets hydra.run.dir, do not pass it
#   TORCHRUN  the torchrun executable (default: torchrun on PATH, e.g. .venv/bin/torchrun)
#   DRY_RUN=1 print the command instead of running it
# Every argument is passed through as a hydra override.
set -euo pipefail

NPROC="${NPROC:-4}"
# Computed once here: a ${now:...} resolved by each rank could differ between ranks.
RUN_DIR="${RUN_DIR:-outputs/torchrun-$(date +%Y%m%d-%H%M%S)}"
TORCHRUN="${TORCHRUN:-torchrun}"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC must be a positive integer"
[[ "$RUN_DIR" =~ ^[^[:space:]\'\"]+$ ]] || die "RUN_DIR='$RUN_DIR' must not contain spaces or quotes"
for arg in "$@"; do
  case "$arg" in
    pipeline.stages=*) die "$arg: the stage count is NPROC (NPROC=$NPROC)" ;;
    hydra.run.dir=*) die "$arg: set RUN_DIR instead" ;;
    *) ;;
  esac
done

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # per-stage threads: pipeline.threads=N
cmd=(
  "$TORCHRUN" --standalone --nproc-per-node "$NPROC"
  -m sidpipe.train "pipeline.stages=$NPROC" "hydra.run.dir=$RUN_DIR" "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "run dir: $RUN_DIR" >&2
exec "${cmd[@]}"
