#!/usr/bin/env bash
# Several nodes joined by torchrun's c10d rendezvous; run the same command on every node.
#
#   # on each of 2 nodes, 4 GPUs each (8 pipeline stages):
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0.cluster:29500 RDZV_ID=cifar-run1 \
#   RUN_DIR=/shared/sidpipe/runs/cifar-run1 launch/torchrun_multi_node.sh model=resnet18 data=cifar10
#
# Environment:
#   NNODES          number of nodes (required)
#   NPROC_PER_NODE  processes per node (default 1); pipeline.stages = NNODES * NPROC_PER_NODE
#   RDZV_ENDPOINT   host:port of the rendezvous store, reachable from every node (required);
#                   the c10d store is hosted by the node whose address it names
#   RDZV_ID         job id, the same on every node (default sidpipe)
#   NODE_RANK       optional; only a hint under c10d, which assigns ranks itself
#   RUN_DIR         run directory (required): the same path on every node, on storage that
#                   all nodes share (NFS, Lustre ...): rank 0 writes the config dump,
#                   summary.json and the wandb run there, the last stage metrics.jsonl
#   TORCHRUN        the torchrun executable (default: sidpipe-torchrun, else torchrun, on PATH)
#   DRY_RUN=1       print the command instead of running it
# Over NCCL, SID sends message headers on a gloo side group (pipeline.host_headers): set
# GLOO_SOCKET_IFNAME (like NCCL_SOCKET_IFNAME) where the default interface cannot reach peers.
# Every argument is passed through as a hydra override. pipeline.max_restarts=N is passed to
# torchrun as --max-restarts N: a died stage restarts every stage, which resume from the
# run's newest checkpoint. torchrun passes SIGUSR1 and SIGTERM on to the stages: they save a
# checkpoint and stop (preemption); continue with resume=auto.
set -euo pipefail

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
NNODES="${NNODES:-}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-sidpipe}"
RUN_DIR="${RUN_DIR:-}"
# sidpipe-torchrun (installed with sidpipe): torchrun without its tracebacks after the
# stages' one-line reasons; plain torchrun where it is not installed
TORCHRUN="${TORCHRUN:-$(command -v sidpipe-torchrun || echo torchrun)}"

[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES='$NNODES' must be set to a positive integer"
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE must be a positive integer"
[[ "$RDZV_ENDPOINT" =~ ^[^[:space:]]+:[0-9]+$ ]] || die "RDZV_ENDPOINT='$RDZV_ENDPOINT' must be set to host:port"
[[ -n "$RUN_DIR" ]] || die "RUN_DIR must be set to a directory on storage shared by all nodes"
[[ "$RUN_DIR" =~ ^[^[:space:]\'\"]+$ ]] || die "RUN_DIR='$RUN_DIR' must not contain spaces or quotes"
max_restarts=0
for arg in "$@"; do
  case "$arg" in
    pipeline.max_restarts=*) max_restarts="${arg#*=}" ;;
    pipeline.stages=*) die "$arg: the stage count is NNODES*NPROC_PER_NODE" ;;
    hydra.run.dir=*) die "$arg: set RUN_DIR instead" ;;
    *) ;;
  esac
done
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "pipeline.max_restarts=$max_restarts must be a non-negative integer"
STAGES=$((NNODES * NPROC_PER_NODE))

node_rank=()
if [[ -n "${NODE_RANK:-}" ]]; then
  node_rank=(--node-rank "$NODE_RANK")
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # per-stage threads: pipeline.threads=N
cmd=(
  "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${node_rank[@]}"
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID"
  --max-restarts "$max_restarts" --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
  -m sidpipe.train "pipeline.stages=$STAGES" "hydra.run.dir=$RUN_DIR" "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "run dir: $RUN_DIR ($STAGES stages on $NNODES nodes)" >&2
exec "${cmd[@]}"
