# The CPU worker image: tuneflow installed as a package with the CPU build of torch. It runs the `cpu` work pool
# (download, prepare, evaluate, export), the Prefect server and the one-shot `prefect-deploy` service of
# infra/compose.yaml, and, on a host without GPUs, the `gpu` work pool too (training on the CPU).
#   docker build -f infra/docker/cpu.Dockerfile -t tuneflow-cpu .        # from the repository root
# BASE_IMAGE: any Debian/Ubuntu image with python3 (3.10+) and its venv module; `make images OFFLINE=1` passes the
# base it makes here (infra/docker/offline-base.sh) and an empty TORCH_INDEX_URL (pip's own index and find-links).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DEBIAN_FRONTEND=noninteractive

# A C++ compiler and Python's headers: DeepSpeed compiles its CPU collectives (deepspeed_shm_comm) on first use.
# python:slim has the headers of its own Python; a Debian base gets them from python3-dev.
RUN headers=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])") \
 && apt-get update \
 && apt-get install -y --no-install-recommends g++ $(test -f "$headers/Python.h" || echo python3-dev) \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip setuptools wheel
# torch first, from the CPU index, so that no later requirement pulls a CUDA build (as `make install` does);
# then DeepSpeed, which imports torch while it installs.
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
RUN pip install --no-build-isolation "deepspeed>=0.17"

WORKDIR /opt/tuneflow
# The requirements before the code: editing tuneflow rebuilds only the last layers.
COPY pyproject.toml README.md ./
RUN mkdir tuneflow && pip install --no-build-isolation . && pip uninstall -y tuneflow
COPY tuneflow ./tuneflow
COPY flows ./flows
COPY tasks ./tasks
COPY infra ./infra
COPY deployments ./deployments
COPY configs ./configs
RUN pip install --no-build-isolation --no-deps . && python -c "import tuneflow.core.config, flows.finetune"

# Flow runs execute as this unprivileged user; /cache holds the Hub and tuneflow caches (a volume in Compose).
RUN useradd --create-home --uid 10001 tuneflow && mkdir -p /cache && chown tuneflow:tuneflow /cache
USER tuneflow
ENV HF_HUB_CACHE=/cache/huggingface/hub TUNEFLOW_CACHE=/cache/tuneflow
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
