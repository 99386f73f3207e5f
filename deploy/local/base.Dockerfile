# The local base for building the project image where no public image registry is reachable
# (scripts/compose-smoke): Debian's minimal root file system (imported as OS by the script,
# from mmdebstrap) plus a virtual environment at /opt/venv holding the CPU build of torch,
# taken from the wheel folder given as the build context. The project's Dockerfile uses
# /opt/venv too, so its `pip install torch==2.13.0` finds the requirement met.
# The package index configuration arrives as BuildKit secrets: it is mounted while pip runs
# and is in no layer.
ARG OS=mates-local-os:bookworm
FROM ${OS}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
RUN --mount=type=bind,target=/wheels \
    --mount=type=secret,id=pip.conf \
    --mount=type=secret,id=ca.crt \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    /opt/venv/bin/pip install --no-cache-dir --find-links /wheels 'torch==2.13.0'
