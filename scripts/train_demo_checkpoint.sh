#!/usr/bin/env bash
# Rebuilds models/weights/filo-demo-tiny.safetensors: the demo profile's heads, trained on synthetic
# data (filo synth, seed 100) over the demo's random tiny CLIP. The bundled samples/ use seed 7, so the
# demo never shows images it was trained on. About 2 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
filo synth "$tmp/data" --categories fabric,wood,metal,tiles,washer,pill,bolt --n-train 0 --n-good 2 \
    --n-defect 3 --size 256 --seed 100
filo train --profile demo --data "$tmp/data" --out "$tmp/run" --epochs-phase1 6 --epochs-phase2 1 \
    --lr-decoder 1e-3 --seed 0
cp "$tmp/run/last.safetensors" models/weights/filo-demo-tiny.safetensors
echo "wrote models/weights/filo-demo-tiny.safetensors"
