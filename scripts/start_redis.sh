#!/usr/bin/env bash
# Installs Debian's redis-server when missing and starts one on 127.0.0.1:${FILO_TEST_REDIS_PORT:-6390}.
# Used by the tests (scripts/test.sh, docs/setup.md); never binds anything but loopback.
set -euo pipefail
port=${FILO_TEST_REDIS_PORT:-6390}
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
  exit 0
fi
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --daemonize yes \
  --logfile /tmp/filo-redis-$port.log
for _ in $(seq 50); do
  redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "redis-server did not come up on 127.0.0.1:$port" >&2
exit 1
