#!/usr/bin/env bash
# Creates (or reuses) .venv with everything FiLo Inspect needs, CPU or GPU.
# torch/torchvision come from the registry's default (CUDA) build: the CPU-only
# wheel cannot import torchvision, which open_clip needs. It runs on CPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.filo-installed
# PyGObject (GenICam cameras for `filo line`) builds only against Debian's GObject-introspection and cairo headers
# (scripts/test.sh installs them first); without them, as on a fresh machine running the demo, it is left out and
# installed by the next run that finds them (the stamp says which it was)
gi=""
if pkg-config --exists gobject-introspection-1.0 cairo 2>/dev/null; then gi="+pygobject"; fi
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)$gi"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# pip's chatter (this machine's pip.conf names index folders that may be absent, and pip warns about
# each for every package) goes to a log, so that a newcomer's first command prints the results; the log
# is shown when an install fails.
log=.venv/install.log
echo "installing FiLo Inspect's dependencies into .venv (log: $log)" >&2
if ! {
  python -m pip install -q --upgrade pip &&
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" &&
  python -m pip install -q -e ".[model,service,eval,dev,line]" &&
  # GenICam cameras for `filo line`: Aravis through PyGObject; 3.51 and later need girepository-2.0, which Debian
  # bookworm lacks (it builds against libgirepository1.0-dev and libcairo2-dev: scripts/test.sh installs them)
  if [ -n "$gi" ]; then python -m pip install -q "pygobject<3.51"; fi
} >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -40 >&2
  echo "setup_env.sh: pip install failed (whole log: $log)" >&2
  exit 1
fi
echo "$want" > "$stamp"
