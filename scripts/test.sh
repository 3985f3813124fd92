#!/usr/bin/env bash
# The whole test suite, from a fresh machine: environment, redis-server, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/start_redis.sh
. .venv/bin/activate
export FILO_TEST_REDIS_URL=${FILO_TEST_REDIS_URL:-redis://127.0.0.1:${FILO_TEST_REDIS_PORT:-6390}/0}
ruff check .
python -m pytest -q "$@"
