#!/usr/bin/env bash
# Issue #15: ResNet-18 and VGG-11 on CIFAR-10 cut into K = 2/4/8 local modules: blockwise SID
# (alpha 0.5, forward KL) vs greedy local learning (alpha 1) vs end-to-end BP on the same
# blocks, 3 seeds. Resumable: rerun the same command and finished runs are reused, an
# interrupted run continues from its last epoch.
# On the full CIFAR-10 (a GPU node): DATA=/path/with/cifar-10-batches-py WIDTH_RESNET=64 \
#   WIDTH_VGG=64 JOBS=1 THREADS=8 benchmarks/cifar10_convnets.sh
# PARTS picks what to run (default: all, in this order):
#   resnet18, vgg11   the study: every method, K and seed, at lr 1e-3
#   bp-epochs         are EPOCHS enough? ResNet-18 BP at twice the epochs
#   vgg11-epochs      does any method still gain? VGG-11, every method, at twice the epochs
#   lr                is one lr fair? VGG-11 at K = 4, 8 and BP with each of LRS
#   cost              training seconds per epoch of each kind of run, one run at a time
#                     (run it on a quiet machine: the study's own s/epoch shares it)
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-benchmarks/results/cifar10-convnets-50-epochs-2026-12-01}
EPOCHS=${EPOCHS:-50}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
PARTS=${PARTS:-resnet18 vgg11 bp-epochs lr cost}
LRS=${LRS:-3e-4 3e-3 1e-2}
WIDTH_RESNET=${WIDTH_RESNET:-8}
WIDTH_VGG=${WIDTH_VGG:-8}

for part in $PARTS; do  # a typo must not surface after hours of training
  case $part in
    resnet18 | vgg11 | bp-epochs | vgg11-epochs | lr | cost) ;;
    *) echo "cifar10_convnets.sh: unknown part '$part' in PARTS (resnet18 vgg11 bp-epochs" \
         "vgg11-epochs lr cost)" >&2
       exit 2 ;;
  esac
done

study() {  # study LR OVERRIDE...: one `sidpipe accuracy` invocation at that Adam lr
  local lr=$1
  shift
  # the run overrides' order is part of each run's name: keep data.root .. schedule as is
  sidpipe accuracy study.name=blockwise "study.datasets=[cifar10]" "study.blocks=[2,4,8]" \
    "study.methods=[sid,greedy]" "study.seeds=[0,1,2]" "study.epochs=$EPOCHS" \
    study.batch_size=128 study.val_fraction=0.1 "study.jobs=$JOBS" "study.threads=$THREADS" \
    "study.out=$OUT" "data.root=$DATA" optim=adam "optim.lr=$lr" optim.schedule=cosine "$@"
}

for part in $PARTS; do
  case $part in
    resnet18) study 1e-3 "study.models=[resnet18]" "model.width=$WIDTH_RESNET" ;;
    vgg11) study 1e-3 "study.models=[vgg11]" "model.width=$WIDTH_VGG" ;;
    # its own folder: the study keeps one epoch count per configuration
    bp-epochs) study 1e-3 "study.epochs=$((2 * EPOCHS))" "study.out=$OUT/bp-$((2 * EPOCHS))-epochs" \
      "study.blocks=[]" "study.models=[resnet18]" "model.width=$WIDTH_RESNET" ;;
    # local modules may need more epochs than BP: the whole VGG-11 grid (its runs are the
    # cheapest) at twice the epochs says whether the gaps still move
    vgg11-epochs) study 1e-3 "study.epochs=$((2 * EPOCHS))" \
      "study.out=$OUT/vgg11-$((2 * EPOCHS))-epochs" "study.models=[vgg11]" "model.width=$WIDTH_VGG" ;;
    # VGG-11 (its runs are the cheapest), the K where the gaps are large; select on validation
    lr) for lr in $LRS; do
          study "$lr" "study.out=$OUT/lr-$lr" "study.blocks=[4,8]" "study.models=[vgg11]" \
            "model.width=$WIDTH_VGG"
        done ;;
    # two epochs (58 batches) of seed 0 of each kind, evaluation off
    cost) for model in resnet18 vgg11; do
            width=$WIDTH_RESNET
            if [[ $model == vgg11 ]]; then width=$WIDTH_VGG; fi
            study 1e-3 "study.out=$OUT/cost/$model" "study.models=[$model]" "model.width=$width" \
              "study.seeds=[0]" study.jobs=1 study.estimate=true study.estimate_steps=58
          done ;;
  esac
done
