# syntax=docker/dockerfile:1
# anoscope offline commands (generate, train, export, evaluate, bench) on a PyTorch CUDA base.
#
#   build (from the repository root):  docker build -f docker/train.Dockerfile -t anoscope-train .
#   run:  docker compose -f docker/compose.yaml run --rm train anoscope train --help
#
# Data is read from /data and everything a run writes (checkpoints, bundles, reports) goes to /runs;
# both are volumes. PyTorch 2.14.1 built for CUDA 13.0 with cuDNN 9: the same CUDA major as the
# service image, so `export`'s parity check and `evaluate` run the exact onnxruntime-gpu build that
# serves, on the GPU. The torch version must stay within the `train` extra's bound in pyproject.toml
# (tests/test_docker.py checks it).
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
COPY docker/requirements-service.txt /tmp/requirements-service.txt
COPY . /src
# The base's PyTorch satisfies the extra's torch bound, so pip keeps it. The service side is held to
# the service image's lock (as constraints), so both images score with the same ONNX Runtime.
RUN pip install --no-cache-dir --constraint /tmp/requirements-service.txt "/src[train]"
RUN groupadd --system --gid 10001 anoscope \
 && useradd --system --uid 10001 --gid anoscope --create-home --home-dir /home/anoscope \
        --shell /usr/sbin/nologin anoscope \
 && mkdir -p /data /runs \
 && chown anoscope:anoscope /data /runs
USER 10001:10001
WORKDIR /runs
VOLUME ["/data", "/runs"]
CMD ["anoscope", "--help"]
