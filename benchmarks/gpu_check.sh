#!/usr/bin/env bash
# The GPU checks of the CUDA path, as one prepared script for a lent single-GPU machine (about
# 10-12 minutes on an H100/H200, each part bounded by a timeout). Run from the repository root:
#
#   OUT=/some/dir benchmarks/gpu_check.sh
#
# 1. the CUDA tests: graphs and eager agree (fp32, bf16), a 2-stage pipeline with graphs on
#    one GPU (staged transport) equals the sequential trainer;
# 2. per-stage step times on ResNet-18 (synthetic CIFAR-shaped data, bf16, S=4, 64-sample
#    messages: bench.batch_size=256, M=4), eager and with pipeline.cuda_graphs=true. The
#    target: SID step (forward + update) <= 1.15 x (BP forward + backward) of the same
#    stage ("step ratio" in bench.md).
#
# 3. the 16-core CPU targets on the same machine's cores (S=4, 4 threads per stage, pinned,
#    synthetic data): SID vs GPipe vs 1F1B on a residual MLP of 16 blocks (target SID/GPipe
#    >= 1.5 at M=4), and ResNet-18 SID with uniform vs auto cuts (target efficiency >= 0.92
#    with partition=auto), and how much a per-message Adam step slows down when 1..16
#    pinned processes step at once (memory-bandwidth contention, a suspect for S=4 scaling).
#
# 4. (PARTS=sim) the simulator where stages do not share a core with their communication:
#    bench_mlp at S=2 measured on the CPU, one thread per stage and not pinned (16 cores for
#    2 stages: gloo's threads get cores of their own), then benchmarks/sim_vs_measured.py
#    against it (target: error <= 10 % for every schedule); and ResNet-18 per-stage costs
#    measured on the GPU, simulated at S=4/8 with partition=auto (target: SID / best BP >= 1.3
#    at equal update size, SID efficiency >= 0.9). About 8 minutes.
#
# PARTS picks what runs (default "cuda cpu16": parts 1-3; "sim": part 4 alone).
#
# The machine needs torch (any CUDA build >= 2.8) plus hydra-core, omegaconf and antlr4:
# where those are missing, pip-download their wheels into .whl/ (see the device notes) and
# the script installs them first. Results go to $OUT (default ./gpu_check_out).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
PARTS=${PARTS:-cuda cpu16}
mkdir -p "$OUT"
want() { [[ " $PARTS " == *" $1 "* ]]; }
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/tests.log"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/tests.log"

if want cuda; then
echo "== CUDA tests" | tee -a "$OUT/tests.log"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/method/test_graphs.py 2>&1 | tee -a "$OUT/tests.log"

for graphs in false true; do
    echo "== step times, pipeline.cuda_graphs=$graphs"
    timeout 240 "$PY" -m sidpipe.cli bench bench.mode=simulate model=resnet18 data=synthetic \
        device=cuda precision=bf16 pipeline.cuda_graphs=$graphs pipeline.threads=1 \
        "bench.stages=[4]" "bench.microbatches=[4,8]" bench.batch_size=256 \
        bench.out_dir=/tmp/gpu_check/out-$graphs hydra.run.dir=/tmp/gpu_check/run-$graphs \
        2>&1 | tail -30
    # only the table comes back: a lent machine returns at most 8 files
    cp /tmp/gpu_check/out-$graphs/bench.md "$OUT/simulate-graphs-$graphs.md"
done

fi

if want cpu16; then
# 16-core CPU: one device per stage = 4 pinned cores each (gloo, as on any CPU cluster).
CPU16=(device=cpu data=synthetic pipeline.cpu_affinity=true pipeline.threads=4 "bench.stages=[4]")
echo "== CPU S=4: residual MLP, 16 blocks"
timeout 240 "$PY" -m sidpipe.cli bench experiment=bench_mlp model.depth=16 "${CPU16[@]}" \
    "bench.microbatches=[4,8]" bench.steps=32 bench.warmup=8 bench.windows=4 \
    bench.out_dir=/tmp/gpu_check/cpu16-mlp hydra.run.dir=/tmp/gpu_check/run-cpu16-mlp 2>&1 | tail -5
cp /tmp/gpu_check/cpu16-mlp/bench.md "$OUT/cpu16-mlp.md"
for cuts in null auto; do
    echo "== CPU S=4: ResNet-18, pipeline.partition=$cuts"
    timeout 240 "$PY" -m sidpipe.cli bench model=resnet18 "${CPU16[@]}" pipeline.partition=$cuts \
        "schemes=[sid,seq_sid]" "bench.microbatches=[4]" bench.steps=12 bench.warmup=4 \
        bench.windows=2 bench.out_dir=/tmp/gpu_check/cpu16-r18-$cuts \
        hydra.run.dir=/tmp/gpu_check/run-cpu16-r18-$cuts 2>&1 | tail -5
    cp /tmp/gpu_check/cpu16-r18-$cuts/bench.md "$OUT/cpu16-resnet18-partition-$cuts.md"
done

echo "== CPU: optimizer-step contention, 1..16 pinned processes"
timeout 120 "$PY" benchmarks/optimizer_contention.py --procs 1 2 4 8 16 | tee "$OUT/optimizer-contention.md"
fi

if want sim; then
echo "== simulator vs measured, S=2, bench_mlp on the CPU, stages not pinned"
timeout 300 "$PY" -m sidpipe.cli bench experiment=bench_mlp data=synthetic device=cpu \
    pipeline.threads=1 "bench.stages=[2]" "bench.microbatches=[1,2,8]" \
    "bench.schemes=[sid,gpipe,1f1b,interleaved_1f1b,looped_bfs,zbv,seq_sid,seq_bp]" \
    bench.steps=32 bench.warmup=6 bench.windows=3 bench.out_dir=/tmp/gpu_check/sim-measured \
    hydra.run.dir=/tmp/gpu_check/run-sim-measured 2>&1 | tail -5
timeout 180 "$PY" benchmarks/sim_vs_measured.py /tmp/gpu_check/sim-measured/bench.json \
    --out /tmp/gpu_check/sim-vs-measured --probe-link --wait-quiet 5 2>&1 | tail -25
cp /tmp/gpu_check/sim-measured/bench.md "$OUT/sim-measured-cpu-s2.md"
cp /tmp/gpu_check/sim-vs-measured/README.md "$OUT/sim-vs-measured-cpu-s2.md"
echo "== ResNet-18 on the GPU, SIMULATED S=4/8, partition=auto"
timeout 240 "$PY" -m sidpipe.cli bench bench.mode=simulate model=resnet18 data=synthetic \
    device=cuda pipeline.partition=auto pipeline.threads=1 "bench.stages=[4,8]" "bench.microbatches=[1,4,8,16]" \
    bench.batch_size=256 bench.out_dir=/tmp/gpu_check/sim-r18 \
    hydra.run.dir=/tmp/gpu_check/run-sim-r18 2>&1 | tail -5
cp /tmp/gpu_check/sim-r18/bench.md "$OUT/simulated-resnet18-gpu.md"
fi
