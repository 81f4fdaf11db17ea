# The MLflow tracking server of infra/compose.yaml: MLflow with its basic-auth app, the Postgres driver and boto3
# (for an S3-compatible artifact store: infra/compose.minio.yaml). Built by `docker compose … build mlflow`;
# BASE_IMAGE as in cpu.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.34"

# /mlflow/artifacts: the artifact store when it is a volume (infra/compose.yaml), owned by the server's user.
RUN useradd --create-home --uid 10001 mlflow && mkdir -p /mlflow/artifacts && chown -R mlflow:mlflow /mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
