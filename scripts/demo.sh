#!/usr/bin/env bash
# The main job on embedded defaults: start the inspection service in-process with the DEMO model
# (tiny, random weights: the pipeline is real, the numbers are not), send the bundled sample
# images through HTTP, and leave the heatmaps and JSON results in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export FILO_DESCRIPTIONS='["samples/descriptions.json"]'
PORT=${FILO_DEMO_PORT:-8000}
OUT=${FILO_DEMO_OUT:-out/demo}
mkdir -p "$OUT"
filo serve --embedded --profile demo --port "$PORT" >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
# normal references and labelled calibration images for the sample categories: filo synth with the
# samples' own seed and size (index 000 of each folder is the bundled sample itself; the client skips it)
filo synth "$OUT/synth" --categories fabric,metal,washer,bolt --n-train 8 --n-good 9 --n-defect 3 \
    --size 256 --seed 7 --overwrite >/dev/null 2>&1
python scripts/demo_client.py --url "http://127.0.0.1:$PORT" --out "$OUT" --synth-root "$OUT/synth" samples/*.png
echo "heatmaps and results: $OUT/ (server log: $OUT/server.log)"
