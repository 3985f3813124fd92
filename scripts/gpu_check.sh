#!/usr/bin/env bash
# The GPU check, one prepared command: CUDA tests, model benchmark, the service under load, one report.
#   bash scripts/gpu_check.sh             on a GPU machine (no network needed: run scripts/gpu_prepare.sh
#                                         beforehand where the registries are, and carry .whl/ and .debs/)
#   bash scripts/gpu_check.sh --dry-run   every step on this CPU with the tiny architectures
# Writes report.md, results.json and the logs under $OUT when set, else out/gpu/. Options: filo_lab/bench/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu}
export OUT
mkdir -p "$OUT"
PY=python3
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
done
# Python packages the machine lacks, from the wheels gpu_prepare.sh downloaded (installed privately)
if ! "$PY" -c "import open_clip, fastapi, pydantic_settings, redis, uvicorn, multipart" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: packages missing and no wheels in .whl/: run scripts/gpu_prepare.sh and carry .whl" >&2
    exit 2
  fi
  SITE=$(mktemp -d /tmp/filo-site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Debian's redis-server for the queue mode, unpacked into a private prefix (never into /)
if ! command -v redis-server >/dev/null 2>&1 && ls .debs/*.deb >/dev/null 2>&1; then
  PREFIX=$(mktemp -d /tmp/filo-redis.XXXXXX)
  for deb in .debs/*.deb; do
    if command -v dpkg >/dev/null 2>&1; then dpkg -x "$deb" "$PREFIX"
    else (cd "$PREFIX" && ar p "$OLDPWD/$deb" data.tar.xz | tar -xJ); fi
  done
  export PATH="$PREFIX/usr/bin:$PATH"
  export LD_LIBRARY_PATH="$PREFIX/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
command -v redis-server >/dev/null 2>&1 || echo "gpu_check: no redis-server: queue mode will be reported as failed" >&2
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" -m filo_lab.bench.gpu_check "$@"
