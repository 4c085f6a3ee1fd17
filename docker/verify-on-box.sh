#!/usr/bin/env bash
# Verify the images on a box with Docker, the NVIDIA Container Toolkit and a GPU: the checks the test
# suite cannot make without a Docker engine (docs/deployment.md, "What was verified here and what
# needs a box"). Run from the repository root; it builds, starts a throw-away service on port 18000
# with only the bundled demo model, checks it, and removes it again. Nothing under /srv is touched.
#
#   docker/verify-on-box.sh            # GPU box: service image, GPU, compose, calibrate, train image
#   CPU_ONLY=1 docker/verify-on-box.sh # box without a GPU: the CPU path only
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
tag="verify-$(date +%s)"
svc="anoscope-service:$tag"
port=18000
work="$(mktemp -d)"
name="anoscope-verify-$tag"
cleanup() {
    docker rm -f "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
gpu_flags=(--gpus 1)
[[ "${CPU_ONLY:-0}" == 1 ]] && gpu_flags=()

step "1. the GPU is visible to containers (driver + NVIDIA Container Toolkit)"
if [[ "${CPU_ONLY:-0}" != 1 ]]; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv
    docker run --rm --gpus 1 nvidia/cuda:13.0.2-base-ubuntu24.04 nvidia-smi -L
fi

step "2. build the service image and report its size"
docker build -f docker/service.Dockerfile -t "$svc" .
docker image ls "$svc" --format '{{.Repository}}:{{.Tag}}  {{.Size}}'

step "3. the image: non-root, Python 3.11, no torch, GPU build of ONNX Runtime"
test "$(docker run --rm "$svc" id -u)" = 10001
docker run --rm "$svc" python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"
if docker run --rm "$svc" python -c "import torch" 2>/dev/null; then echo "torch is in the image" >&2; exit 1; fi
docker run --rm "$svc" python -c "
import onnxruntime as ort
from onnxruntime.capi import build_and_package_info as b
print('onnxruntime', ort.__version__, 'built for CUDA', b.cuda_version, ort.get_available_providers())
assert 'CUDAExecutionProvider' in ort.get_available_providers()"

if [[ "${CPU_ONLY:-0}" != 1 ]]; then
    step "4. the bundled model runs on the CUDA execution provider inside the image"
    docker run --rm --gpus 1 "$svc" python -c "
from service.engine import OnnxEngine
from service.settings import PACKAGED_MODEL_DIR
e = OnnxEngine(PACKAGED_MODEL_DIR / 'demo', providers=('cuda', 'cpu'))
e.warmup((1, 8))
print('provider:', e.provider)
assert e.provider == 'CUDAExecutionProvider', 'CUDA provider failed to load: check driver >= 580 and the base image'"
fi

step "5. the service starts, turns healthy through the image's HEALTHCHECK, and predicts"
docker run -d --name "$name" "${gpu_flags[@]}" -p "127.0.0.1:$port:8000" "$svc" >/dev/null
for _ in $(seq 1 60); do
    status="$(docker inspect --format '{{.State.Health.Status}}' "$name")"
    [[ "$status" == healthy ]] && break
    [[ "$(docker inspect --format '{{.State.Running}}' "$name")" == true ]] || { docker logs "$name"; exit 1; }
    sleep 3
done
test "$status" = healthy || { docker logs "$name"; echo "container never turned healthy" >&2; exit 1; }
# Requests go from inside the container (its Python has Pillow; the host may have neither curl nor Python).
docker exec "$name" python -c "
import io, json, urllib.request
import numpy as np
from PIL import Image
buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, 'PNG')
req = urllib.request.Request('http://127.0.0.1:8000/v1/predict', data=buf.getvalue(), headers={'Content-Type': 'image/png'})
body = json.load(urllib.request.urlopen(req, timeout=60))
print(json.dumps(body)[:400])
assert 'anomaly_score' in json.dumps(body)
metrics = urllib.request.urlopen('http://127.0.0.1:8000/metrics', timeout=30).read().decode()
assert '# TYPE' in metrics
print(*[line for line in metrics.splitlines() if line.startswith('# TYPE')][:5], sep='\\n')"
docker logs "$name" 2>&1 | grep -iE "provider|loaded" | head -n 20 || true

step "6. docker stop is graceful (SIGTERM; uvicorn shuts down, then re-raises it: exit code 0 or 143)"
docker stop -t 30 "$name" >/dev/null
code="$(docker inspect --format '{{.State.ExitCode}}' "$name")"
[[ "$code" == 0 || "$code" == 143 ]] || { echo "exit code $code after docker stop" >&2; exit 1; }
docker logs "$name" 2>&1 | grep -q "Application shutdown complete"

step "7. calibrate runs inside the image on a writable copy of a bundle"
mkdir -p "$work/normals" "$work/bundles"
docker run --rm --user "$(id -u):$(id -g)" -v "$work:/work" "$svc" python -c "
import shutil
import numpy as np
from PIL import Image
from service.settings import PACKAGED_MODEL_DIR
shutil.copytree(PACKAGED_MODEL_DIR / 'demo', '/work/bundles/demo')
rng = np.random.default_rng(0)
for i in range(30):
    Image.fromarray(rng.normal(128, 12, (128, 128, 3)).clip(0, 255).astype(np.uint8)).save(f'/work/normals/{i:03d}.png')"
docker run --rm "${gpu_flags[@]}" --user "$(id -u):$(id -g)" -v "$work:/work" "$svc" \
    anoscope calibrate --bundle /work/bundles/demo --normals /work/normals --target-fpr 0.1 \
    --report-dir /work/report
docker run --rm -v "$work:/work:ro" "$svc" python -c "
import json
t = json.load(open('/work/bundles/demo/model.json'))['thresholds']
print('thresholds:', t)
assert t['image'] is not None"

step "8. compose: config resolves; the service comes up healthy with the GPU reserved"
chmod -R a+rX "$work"  # the service reads /models as uid 10001
cp -n docker/.env.example docker/.env.verify
export MODELS_DIR="$work/bundles" PUBLISH="127.0.0.1:$port" IMAGE_TAG="$tag"
compose=(docker compose -f docker/compose.yaml --env-file docker/.env.verify -p "anoscope-$tag")
"${compose[@]}" config --quiet
if [[ "${CPU_ONLY:-0}" == 1 ]]; then svc_name=anoscope-cpu; else svc_name=anoscope; fi
"${compose[@]}" up -d --no-build --wait --wait-timeout 300 "$svc_name"
"${compose[@]}" ps
"${compose[@]}" down
rm -f docker/.env.verify

if [[ "${CPU_ONLY:-0}" != 1 && "${SKIP_TRAIN:-0}" != 1 ]]; then
    step "9. the training image builds, sees the GPU and runs the offline commands' help"
    docker build -f docker/train.Dockerfile -t "anoscope-train:$tag" .
    docker run --rm --gpus 1 "anoscope-train:$tag" python -c "
import torch, onnxruntime as ort
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())
assert torch.cuda.is_available()
assert 'CUDAExecutionProvider' in ort.get_available_providers()"
    docker run --rm "anoscope-train:$tag" anoscope train --help >/dev/null
fi

step "all checks passed"
echo "remove the test images when done: docker image rm $svc anoscope-train:$tag"
