# PostgreSQL from Debian's postgresql package, for machines that reach Debian's archive but
# no public image registry (scripts/compose-smoke). Configured like the official image:
# POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB create the role and the database on the
# first start, PGDATA is /var/lib/postgresql/data, PGPORT the port (5432).
ARG OS=mates-local-os:bookworm
FROM ${OS}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
 && chmod 700 /var/lib/postgresql/data \
 && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/bin:$PATH
USER postgres
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint"]
CMD ["postgres"]
