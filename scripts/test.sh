#!/usr/bin/env bash
# The whole test suite, from a fresh machine: environment, redis-server, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/start_redis.sh
# Debian's headless browser and its driver, for the QA console tests (tests/test_console_browser.py).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# Debian's PostgreSQL, for the records database tests (tests/postgres_server.py starts throw-away clusters).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
. .venv/bin/activate
export FILO_TEST_REDIS_URL=${FILO_TEST_REDIS_URL:-redis://127.0.0.1:${FILO_TEST_REDIS_PORT:-6390}/0}
ruff check .
python -m pytest -q "$@"
