# syntax=docker/dockerfile:1
# anoscope inspection service: the torch-free FastAPI + ONNX Runtime runtime, on one NVIDIA GPU.
#
#   build (from the repository root):  docker build -f docker/service.Dockerfile -t anoscope-service .
#   run:                               docker compose -f docker/compose.yaml up -d   (docs/deployment.md)
#
# Why this base: the CUDA and cuDNN majors must be the ones the pinned onnxruntime-gpu was built
# against. onnxruntime-gpu 1.31.1 (docker/requirements-service.txt) is the PyPI build for CUDA 13.0
# and cuDNN 9: its build info says cuda_version 13.0, its CUDA provider links libcublas.so.13 and
# libcudart.so.13, and its `cudnn` extra asks for nvidia-cudnn-cu13 9.x. NVIDIA's minor-version
# compatibility lets any 13.x runtime serve it; the host needs a driver for CUDA 13 (R580 or newer).
# The *runtime* flavour carries the shared libraries only, no compiler. tests/test_docker.py checks
# this tag against the lock, and the lock's onnxruntime build against this tag.

# --- cuda-python: the CUDA base plus CPython 3.11 (the interpreter the lock was resolved for) -------
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS cuda-python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8
# Ubuntu 24.04 ships Python 3.12; 3.11 comes from the deadsnakes PPA. software-properties-common is
# only needed to add the PPA and leaves again in the same layer. Debian package versions are not
# pinned (see docker/.hadolint.yaml); the base image tag and the Python lock pin what matters.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*

# --- build: a virtual environment from the lock, then the project without dependencies ------------
FROM cuda-python AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
# The lock alone, in its own layer, so code changes do not re-download 800 MB of wheels.
# --no-deps: the lock is the whole closure; `pip check` below fails the build if it ever is not.
COPY docker/requirements-service.txt /tmp/requirements-service.txt
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -r /tmp/requirements-service.txt
COPY . /src
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /src \
 && /opt/venv/bin/pip check \
 && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch leaked into the service image" >&2; exit 1; fi

# --- service: the runtime image ---------------------------------------------------------------------
FROM cuda-python AS service
LABEL org.opencontainers.image.title="anoscope-service" \
      org.opencontainers.image.description="anoscope visual anomaly detection service (FastAPI + ONNX Runtime, CUDA 13 / cuDNN 9)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed unprivileged uid/gid (10001; 1000 belongs to Ubuntu's default `ubuntu` user). Bundles
# mounted at /models only need to be readable by it; `anoscope calibrate` needs them writable.
RUN groupadd --system --gid 10001 anoscope \
 && useradd --system --uid 10001 --gid anoscope --create-home --home-dir /home/anoscope \
        --shell /usr/sbin/nologin anoscope \
 && mkdir -p /models
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/anoscope-healthcheck
# Settings are ANOSCOPE_* environment variables (docker/.env.example). Only container facts are fixed
# here: listen on all interfaces, port 8000. Mount bundles at /models and set ANOSCOPE_MODEL_DIR=/models
# (compose.yaml does); with nothing mounted the image serves the demo model bundled in the package.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    ANOSCOPE_HOST=0.0.0.0 \
    ANOSCOPE_PORT=8000
USER 10001:10001
WORKDIR /home/anoscope
EXPOSE 8000
# /readyz turns 200 once every model is loaded and warm; the start period covers that warm-up
# (cuDNN's exhaustive convolution search runs once per batch size at load).
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "/usr/local/bin/anoscope-healthcheck", "/readyz"]
# ONE process, no uvicorn --workers: the service micro-batches concurrent requests into one ONNX
# Runtime session per model, and each worker process would load its own copy of every model into GPU
# memory and split the batches, so throughput drops while memory multiplies. One process per GPU; for
# two GPUs run two containers, each reserving one device (docs/deployment.md).
CMD ["anoscope", "serve"]
