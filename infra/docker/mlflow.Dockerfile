# syntax=docker/dockerfile:1
# The MLflow tracking server of infra/compose.yaml: MLflow with its basic-auth app, the Postgres driver and boto3
# for the S3-compatible artifact store (MinIO). Built by `docker compose -f infra/compose.yaml build mlflow`.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.34"

RUN useradd --create-home --uid 10001 mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
