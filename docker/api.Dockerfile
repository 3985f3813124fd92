# syntax=docker/dockerfile:1
# FiLo Inspect API image: `filo serve` (FastAPI) in queue mode. It never runs a model, so it
# installs the package without the `model` extra: no torch, no CUDA wheels (docker/README.md).
# Build from the repo root:  docker build -f docker/api.Dockerfile -t filo-api:0.1.0 .
FROM python:3.11.14-slim-bookworm

ARG PIP_VERSION=26.3

# HOME and XDG_CACHE_HOME point into /tmp so library caches still work when the root
# filesystem is read-only (Kubernetes mounts an emptyDir on /tmp).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache

RUN groupadd --system --gid 10001 filo \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin filo \
    && python -m venv /opt/venv \
    && pip install --no-cache-dir "pip==${PIP_VERSION}"

# The source is bind-mounted, not copied, so no layer holds it. .dockerignore limits the
# context to the package. The `service` extra only: tests/test_deploy.py and the torch-free API
# test in tests/test_worker_redis.py keep this process free of torch.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir "/src[service]"

WORKDIR /tmp
USER 10001:10001
EXPOSE 8000

# Liveness only (Kubernetes ignores HEALTHCHECK and probes /healthz and /readyz itself).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["filo"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
