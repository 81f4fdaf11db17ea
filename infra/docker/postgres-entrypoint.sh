#!/bin/sh
# The entrypoint of infra/docker/postgres.Dockerfile. On an empty data folder: initdb with POSTGRES_USER's password
# (password logins over TCP, scram-sha-256), then the scripts in /docker-entrypoint-initdb.d against a server that
# listens on its socket only. Then the command (postgres).
set -eu
export POSTGRES_USER="${POSTGRES_USER:-postgres}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set}"
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl --wait --silent --options "-c listen_addresses=''" start
  for script in /docker-entrypoint-initdb.d/*.sh; do
    [ -e "$script" ] && sh "$script"
  done
  pg_ctl --wait --silent --mode fast stop
  echo "postgres-entrypoint.sh: initialized $PGDATA"
fi
exec "$@"
