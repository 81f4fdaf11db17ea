# syntax=docker/dockerfile:1
# The CPU worker image: tuneflow installed as a package on python-slim with the CPU build of torch. It runs the
# `cpu` work pool (download, prepare, evaluate, export) and the one-shot `deploy` service of infra/compose.yaml.
#   docker build -f infra/docker/cpu.Dockerfile -t tuneflow-cpu .        # from the repository root
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

RUN pip install --upgrade pip setuptools wheel
# torch first, from the CPU index, so that no later requirement pulls a CUDA build (as `make install` does);
# then DeepSpeed, which imports torch while it installs.
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
RUN pip install --no-build-isolation . && python -c "import tuneflow.core.config, flows.finetune"

# Flow runs execute as this unprivileged user; /cache holds the Hub and tuneflow caches (a volume in Compose).
RUN useradd --create-home --uid 10001 tuneflow && mkdir -p /cache && chown tuneflow:tuneflow /cache
USER tuneflow
ENV HF_HUB_CACHE=/cache/huggingface/hub TUNEFLOW_CACHE=/cache/tuneflow
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
