#!/usr/bin/env bash
# Rebuilds the bundled default model service/assets/models/demo from scratch (about 6 minutes on 2 CPU
# cores): synthetic "fabric" surfaces, a light Skip-GANomaly (64 px, width x0.25, about 2.2 MB),
# calibrated at a 1 % false-alarm target on 200 fresh normal images and 100 defective ones.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ANOSCOPE:-.venv/bin/anoscope}
WORK=${WORK:-$(mktemp -d)}
$A generate --out "$WORK/data" --texture fabric --n-train 240 --n-test-good 20 --n-test-defect 10 --image-size 128 --seed 0 --overwrite
$A generate --out "$WORK/cal" --texture fabric --n-train 0 --n-test-good 200 --n-test-defect 25 --image-size 128 --seed 1 --overwrite
$A train --data "$WORK/data" --out "$WORK/run" --model skipganomaly --image-size 64 --width-mult 0.25 \
  --epochs 200 --time-budget 300 --seed 0 --no-progress
$A export --checkpoint "$WORK/run" --out "$WORK/demo" --name demo
$A calibrate --bundle "$WORK/demo" --normals "$WORK/cal" --target-fpr 0.01 --providers cpu --report-dir "$WORK/calibration"
$A evaluate --bundle "$WORK/demo" --data "$WORK/data" --out "$WORK/report" --providers cpu
rm -rf service/assets/models/demo
cp -r "$WORK/demo" service/assets/models/demo
cp "$WORK/cal/test/good/000.png" service/assets/examples/good.png
cp "$WORK/cal/test/spot/000.png" service/assets/examples/defect.png
echo "demo bundle rebuilt; work files in $WORK"
