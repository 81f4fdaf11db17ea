# syntax=docker/dockerfile:1
# The GPU worker image: tuneflow installed as a package on a CUDA runtime base with a CUDA build of torch. It runs
# the `gpu` work pool (training under torchrun + DeepSpeed) in infra/compose.yaml and the TrainJob pods of
# infra/k8s/.
#   docker build -f infra/docker/gpu.Dockerfile -t tuneflow-gpu .        # from the repository root
# CUDA 13.0 needs an NVIDIA driver >= 580 on the host; for an older driver pass a matching pair, e.g.
#   --build-arg CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG CUDA_BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DEBIAN_FRONTEND=noninteractive

# A C compiler and Python headers: Triton and DeepSpeed compile small kernels on first use.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip setuptools wheel
# torch first, from the CUDA index matching the base image (as `make install` installs it first); then DeepSpeed,
# which imports torch while it installs, against that torch.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
RUN pip install --no-build-isolation "deepspeed>=0.17"

WORKDIR /opt/tuneflow
COPY pyproject.toml README.md ./
COPY tuneflow ./tuneflow
COPY flows ./flows
COPY tasks ./tasks
COPY infra ./infra
COPY deployments ./deployments
COPY configs ./configs
RUN pip install --no-build-isolation . && python -c "import tuneflow.core.config, flows.train"

# Training runs as this unprivileged user; /cache holds the Hub and tuneflow caches (a volume in Compose).
RUN useradd --create-home --uid 10001 tuneflow && mkdir -p /cache && chown tuneflow:tuneflow /cache
USER tuneflow
ENV HF_HUB_CACHE=/cache/huggingface/hub TUNEFLOW_CACHE=/cache/tuneflow PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
