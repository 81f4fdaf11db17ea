#!/bin/sh
# Runs once, on the first start of the Postgres container (an empty data volume): a role and a database for the
# Prefect server and for the MLflow server (its tracking store and, in mlflow_auth, its users), each role owning
# only its own. Passwords come from the container's environment (infra/.env), never from this file.
set -eu
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
# The passwords reach psql through its environment (\getenv, psql 15+), never its command line (visible in ps).
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv prefect_pw PREFECT_DB_PASSWORD
\getenv mlflow_pw MLFLOW_DB_PASSWORD
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
SQL
echo "tuneflow: databases prefect, mlflow and mlflow_auth created"
