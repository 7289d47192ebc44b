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
#   heads             issue #27: SID and greedy each with the pool head and with HEAD (the
#                     new head), BP, both models, K = 2/4/8, into $HEADS_OUT/lr-<lr>. Each
#                     cell's lr is chosen on validation (seed 0, HEAD_LRS, extended to
#                     HEAD_LRS_BEYOND at an edge), then seeds 1 and 2 run at that lr; the
#                     table is benchmarks/lr_selection.py. ResNet-18 at K = 4 and 8 first,
#                     then ResNet-18 at K = 2, then VGG-11. Not in the default PARTS; run it
#                     as EPOCHS=100 PARTS=heads benchmarks/cifar10_convnets.sh
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
HEAD=${HEAD:-spatial}
HEAD_LRS=${HEAD_LRS:-3e-4 1e-3 3e-3}
HEAD_LRS_BEYOND=${HEAD_LRS_BEYOND:-1e-4 1e-2}  # tried only where the best is at an edge
PYTHON=${PYTHON:-python}  # runs benchmarks/lr_selection.py: the one sidpipe is installed in
HEADS_OUT=${HEADS_OUT:-benchmarks/results/cifar10-heads-$EPOCHS-epochs-2026-12-03}

for part in $PARTS; do  # a typo must not surface after hours of training
  case $part in
    resnet18 | vgg11 | bp-epochs | vgg11-epochs | lr | cost | heads) ;;
    *) echo "cifar10_convnets.sh: unknown part '$part' in PARTS (resnet18 vgg11 bp-epochs" \
         "vgg11-epochs lr cost heads)" >&2
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
    # The lr is chosen per cell (model, method, head, K) on validation, on seed 0: seed 0 at
    # every lr of HEAD_LRS, then what benchmarks/lr_selection.py --next asks for, until it asks
    # for nothing: seed 0 one lr further out (of HEAD_LRS_BEYOND) where the best is at the
    # grid's edge, else seeds 1 and 2 at the cell's chosen lr. BP runs once per (model, seed,
    # lr): every cut of a model shares its BP runs.
    heads) lr_args=()
           for lr in $HEAD_LRS_BEYOND $HEAD_LRS; do lr_args+=("$lr=$HEADS_OUT/lr-$lr"); done
           base=$(tr ' ' ',' <<< "$HEAD_LRS")
           for cut in "resnet18 $WIDTH_RESNET [4,8]" "resnet18 $WIDTH_RESNET [2]" \
                      "vgg11 $WIDTH_VGG [2,4,8]"; do
             read -r model width blocks <<< "$cut"
             cell=("study.models=[$model]" "model.width=$width")
             for lr in $HEAD_LRS; do
               study "$lr" "study.out=$HEADS_OUT/lr-$lr" "${cell[@]}" "study.blocks=$blocks" \
                 "study.heads=[pool,$HEAD]" "study.seeds=[0]"
             done
             last=""
             ask=("$PYTHON" benchmarks/lr_selection.py --next --base "$base" --seeds 0,1,2
                  --models "$model" --blocks "${blocks:1:-1}" "${lr_args[@]}")
             while next=$("${ask[@]}") && [[ -n "$next" ]]; do
               if [[ "$next" == "$last" ]]; then  # a run did not give the rows asked for
                 echo "cifar10_convnets.sh: the lr search made no progress; still to run:" \
                   "$(tr '\n' ';' <<< "$next")" >&2
                 exit 1
               fi
               last=$next
               # the same runs as few calls as give exactly them (--calls), so each call
               # runs JOBS at a time; fd 3: sidpipe must not read the list on its stdin
               todo=$("${ask[@]}" --calls)
               while read -r lr seeds methods heads ks baseline <&3; do
                 if [[ $methods == "[]" ]]; then  # BP alone
                   what=("study.blocks=[]")
                 else
                   what=("study.baseline=$baseline" "study.blocks=$ks" "study.methods=$methods"
                         "study.heads=$heads")
                 fi
                 study "$lr" "study.out=$HEADS_OUT/lr-$lr" "${cell[@]}" "${what[@]}" \
                   "study.seeds=$seeds"
               done 3<<< "$todo"
             done
           done ;;
  esac
done
