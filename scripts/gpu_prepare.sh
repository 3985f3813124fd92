#!/usr/bin/env bash
# Prepares, on a machine with the package registries, what `scripts/gpu_check.sh` needs on a bare GPU
# machine that has no network: Python wheels (.whl/) for what its image lacks, and Debian's redis-server
# (.debs/) for the queue-mode run. Both folders are git-ignored and travel with the run (carry them).
#
# The GPU image brings torch, torchvision, transformers, timm, safetensors, numpy, opencv, httpx and
# prometheus-client of its own (their versions are recorded in the check's report); what it lacks is listed
# here, pinned to the versions the development venv runs, for CPython 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

# name==version of each wheel the GPU image lacks (data, not code: edit here when a pin moves)
WHEELS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 python-multipart==0.0.34
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
  typing-inspection==0.4.5 python-dotenv==1.2.4 redis==8.2.0 opentelemetry-api==1.45.2
  typing_extensions==4.16.0 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3
)
# What the GPU image already holds of the project's runtime needs (the device's package list), and what
# the check does not use there (records go to SQLite, so no PostgreSQL driver): tests/test_gpu_check.py
# fails when a runtime dependency of the `model` or `service` extra is in none of the three lists.
IMAGE_HAS=(numpy pillow opencv-python-headless tqdm rich torch torchvision transformers safetensors httpx
  prometheus-client uvloop h11 anyio markupsafe)
NOT_CARRIED=(psycopg)
# Debian packages of redis-server and its libraries (unpacked with dpkg -x into a private prefix there)
DEBS=(redis-server redis-tools liblzf1 libjemalloc2)

mkdir -p .whl .debs
want=$(printf '%s\n' "${WHEELS[@]}" "${DEBS[@]}" | sha256sum | cut -c1-16)
if [ -f .whl/.stamp ] && [ "$(cat .whl/.stamp)" = "$want" ]; then
  echo "gpu_prepare: .whl/ and .debs/ are up to date"
  exit 0
fi
rm -f .whl/*.whl .debs/*.deb
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq >/dev/null 2>&1 || true
(cd .debs && apt-get download -qq "${DEBS[@]}")
echo "$want" > .whl/.stamp
du -sh .whl .debs
echo "gpu_prepare: $(ls .whl/*.whl | wc -l) wheels in .whl/, $(ls .debs/*.deb | wc -l) packages in .debs/"
