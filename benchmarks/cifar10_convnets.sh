#!/usr/bin/env bash
# Issue #15: ResNet-18 and VGG-11 on CIFAR-10 cut into K = 2/4/8 local modules: blockwise SID
# (alpha 0.5, forward KL) vs greedy local learning (alpha 1) vs end-to-end BP on the same
# blocks, 3 seeds. Resumable: rerun the same command and finished runs are reused.
# On the full CIFAR-10 (a GPU node): DATA=/path/with/cifar-10-batches-py WIDTH_RESNET=64 \
#   WIDTH_VGG=64 JOBS=1 THREADS=8 benchmarks/cifar10_convnets.sh
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-benchmarks/results/cifar10-convnets-2026-12-01}
EPOCHS=${EPOCHS:-25}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
common=(study.name=blockwise "study.datasets=[cifar10]" "study.blocks=[2,4,8]"
        "study.methods=[sid,greedy]" "study.seeds=[0,1,2]" "study.epochs=$EPOCHS"
        study.batch_size=128 study.val_fraction=0.1 "study.jobs=$JOBS" "study.threads=$THREADS"
        "study.out=$OUT" "data.root=$DATA" optim=adam optim.lr=1e-3 optim.schedule=cosine)
sidpipe accuracy "${common[@]}" "study.models=[resnet18]" "model.width=${WIDTH_RESNET:-8}"
sidpipe accuracy "${common[@]}" "study.models=[vgg11]" "model.width=${WIDTH_VGG:-8}"
# Are 25 epochs enough for BP? The same BP runs at twice the epochs (its own folder: the
# study keeps one epoch count per configuration)
sidpipe accuracy "${common[@]}" "study.epochs=$((2 * EPOCHS))" "study.out=$OUT/bp-$((2 * EPOCHS))-epochs" \
  "study.blocks=[]" "study.models=[resnet18]" "model.width=${WIDTH_RESNET:-8}"
