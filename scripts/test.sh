#!/usr/bin/env bash
# The whole test suite, from a fresh machine: environment, redis-server, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's packages for the line connector's tests (tests/test_line_*.py): mosquitto (the MQTT broker), Aravis's
# fake GigE Vision camera and its typelib, and what pip needs to build PyGObject (setup_env.sh) against them.
if [ ! -x /usr/sbin/mosquitto ] || [ ! -x /usr/bin/arv-fake-gv-camera-0.8 ] ||
   ! ls /usr/lib/*/girepository-1.0/Aravis-0.8.typelib >/dev/null 2>&1 ||
   ! pkg-config --exists gobject-introspection-1.0 cairo 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto aravis-tools gir1.2-aravis-0.8 \
    libgirepository1.0-dev libcairo2-dev pkg-config >/dev/null
fi
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
