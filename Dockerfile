# sidpipe on a CUDA build of PyTorch.
#
#   docker build -t sidpipe .
#   docker run --rm --gpus all --ipc=host -v /path/to/data:/data -v "$PWD/outputs:/runs/outputs" \
#       sidpipe train model=resnet18 data=cifar10 pipeline.stages=4
#
# The base image brings Python 3.11 and torch 2.8.0+cu128; pick another with
# --build-arg BASE_IMAGE=pytorch/pytorch:<tag> (its torch must be >= 2.8).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sidpipe
COPY pyproject.toml README.md ./
COPY sidpipe ./sidpipe
COPY conf ./conf
COPY launch ./launch

# Editable: the hydra configs are read from conf/ beside the package. Pinning torch to the
# image's own build keeps pip from replacing it (and its CUDA libraries) with a PyPI wheel;
# the other dependencies are the ranges in pyproject.toml.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])')" \
    && pip install --no-cache-dir -e . "torch==${torch_version}" \
    && sidpipe train --cfg job > /dev/null  # the entry point finds its configs

# Unprivileged user. /runs (the working directory: hydra writes outputs/ here) is
# world-writable like /tmp so `docker run --user "$(id -u):$(id -g)"` works too; caches and
# settings of wandb and matplotlib go to /tmp for users without a home directory.
RUN groupadd --gid 10001 sidpipe \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash sidpipe \
    && mkdir -p /data /runs \
    && chown sidpipe:sidpipe /data \
    && chmod 1777 /runs
ENV SIDPIPE_DATA=/data \
    WANDB_CONFIG_DIR=/tmp/wandb-config \
    WANDB_CACHE_DIR=/tmp/wandb-cache \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /runs

ENTRYPOINT ["sidpipe"]
CMD ["train"]
