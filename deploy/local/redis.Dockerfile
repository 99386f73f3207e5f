# Redis from Debian's redis-server package, for machines that reach Debian's archive but no
# public image registry (scripts/compose-smoke). It serves what redis:7.4 serves in
# docker-compose.yml: redis-server run from /data, redis-cli for the healthcheck.
ARG OS=mates-local-os:bookworm
FROM ${OS}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD ["redis-server"]
