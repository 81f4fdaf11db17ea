# PostgreSQL from Debian's packages, for hosts that cannot pull the official `postgres` image: `make images OFFLINE=1`
# builds it as tuneflow-postgres:15 on the base it makes (infra/docker/offline-base.sh) and sets POSTGRES_IMAGE.
# It keeps the part of the official image's interface that infra/compose.yaml uses: POSTGRES_USER/POSTGRES_PASSWORD,
# the scripts in /docker-entrypoint-initdb.d run once on an empty data folder, PGDATA=/var/lib/postgresql/data.
ARG BASE_IMAGE=tuneflow-base:bookworm
FROM ${BASE_IMAGE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
RUN mkdir -p /docker-entrypoint-initdb.d "$PGDATA" /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql && chmod 700 "$PGDATA"
USER postgres
EXPOSE 5432
ENTRYPOINT ["postgres-entrypoint.sh"]
CMD ["postgres", "-c", "listen_addresses=*"]
