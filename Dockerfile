# ldm-serve: one image for the gateway and the worker (the command picks the role).
#   docker build -t ldm-serve:cpu .                         CPU torch (default target)
#   docker build --target cuda -t ldm-serve:cuda .          CUDA torch + NVML metrics, LDM_DEVICE=cuda
#   docker run ldm-serve:cpu gateway | worker               see docs/deploy.md
# Build arguments: BASE_IMAGE (any Debian-like image with python3 + venv), TORCH_SPEC, TORCH_INDEX_URL /
# TORCH_CUDA_INDEX_URL (where torch comes from; empty = the normal index), PIP_FIND_LINKS and PIP_CERT
# (passed to pip inside the build: a local wheel folder and a CA bundle, e.g. behind a proxy).
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------
# builders: a virtual environment in /opt/venv with torch, the project and its dependencies
FROM ${BASE_IMAGE} AS venv
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src

FROM venv AS builder-cpu
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY ldm ./ldm
COPY ldm_serve ./ldm_serve
COPY service ./service
COPY worker ./worker
COPY launcher ./launcher
RUN /opt/venv/bin/pip install --no-cache-dir . && /opt/venv/bin/pip check

FROM venv AS builder-cuda
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG NVML_SPEC=nvidia-ml-py>=12
RUN /opt/venv/bin/pip install --no-cache-dir ${TORCH_CUDA_INDEX_URL:+--extra-index-url "$TORCH_CUDA_INDEX_URL"} \
        "$TORCH_SPEC" "$NVML_SPEC"
COPY pyproject.toml README.md ./
COPY ldm ./ldm
COPY ldm_serve ./ldm_serve
COPY service ./service
COPY worker ./worker
COPY launcher ./launcher
RUN /opt/venv/bin/pip install --no-cache-dir . && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------------
# runtime: no compilers, no pip cache, no sources; a non-root user; models under /models
FROM ${BASE_IMAGE} AS runtime
# jemalloc: CPU workers preload it (LDM_CPU_ALLOCATOR=auto, ldm_serve/cpu_allocator.py); unpinned, as the
# base image's Debian release decides the version (any 5.x)
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --no-log-init --create-home --home-dir /home/ldm --uid 10001 --user-group ldm \
    && mkdir -p /models /home/ldm/.cache/ldm-serve \
    && chown -R ldm:ldm /home/ldm
COPY models/bundled /models/bundled
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/ldm \
    XDG_CACHE_HOME=/home/ldm/.cache \
    LDM_HOST=0.0.0.0 \
    LDM_PORT=8000 \
    LDM_GRPC_PORT=50051 \
    LDM_MODEL_PATH=/models/bundled/bundled.safetensors
WORKDIR /home/ldm
EXPOSE 8000 50051 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-m", "ldm_serve.healthcheck"]
ENTRYPOINT ["ldm-serve"]
CMD ["gateway"]

FROM runtime AS cuda
COPY --from=builder-cuda /opt/venv /opt/venv
ENV LDM_DEVICE=cuda \
    LDM_DTYPE=float16 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001

# the default target (last stage): CPU
FROM runtime AS cpu
COPY --from=builder-cpu /opt/venv /opt/venv
USER 10001:10001
