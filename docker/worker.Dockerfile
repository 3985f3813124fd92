# syntax=docker/dockerfile:1
# FiLo Inspect GPU worker image: `filo worker` reads batches from the Redis stream
# `filo:requests` (group `filo-workers`) and serves /healthz /readyz /metrics on :9100.
# Build from the repo root:  docker build -f docker/worker.Dockerfile -t filo-worker:0.1.0 .
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ARG PIP_VERSION=26.3
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG DEBIAN_FRONTEND=noninteractive

# The torch 2.14.1 wheel from PyPI bundles its own CUDA 13 user-space libraries (cuda-toolkit
# 13.0.x, cuDNN 9 for cu13) and so needs a host driver that supports CUDA 13 (>= 580). The
# base image advertises cuda>=12.4; overriding NVIDIA_REQUIRE_CUDA makes the NVIDIA container
# runtime refuse an older driver at start instead of torch failing later. See docker/README.md.
ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache

# Ubuntu 22.04's python3.11 (jammy-updates). Apt versions are not pinned: the archive keeps
# only the newest build of each package, so a pin breaks the build at the next security
# update (DL3008 is ignored in .hadolint.yaml for that reason).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 filo \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin filo \
    && python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir "pip==${PIP_VERSION}"

# torch/torchvision (several GB with their CUDA wheels) in their own layer.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The source is bind-mounted, not copied, so no layer holds it.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" "/src[worker]"

WORKDIR /tmp
USER 10001:10001
EXPOSE 9100

# Liveness of the metrics/health server, which must answer while the model is still loading;
# start-period covers a slow first load. Kubernetes uses its own probes instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"]

ENTRYPOINT ["filo"]
CMD ["worker"]
