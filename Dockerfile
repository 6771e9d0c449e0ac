# syntax=docker/dockerfile:1.7
# Two images from one file: `runtime` (the default target), which the Ray head and the GPU (or
# CPU) Ray workers run, and `ingest` (`--target ingest`), the slim image of the `captioner run`
# pods: no torch, no TensorFlow, no Ray.
#
# Base: python:3.11-slim, not nvidia/cuda or rayproject/ray. PyPI's torch 2.13.0 wheel for
# Linux x86_64 is the CUDA build and brings its own CUDA runtime, cuDNN and NCCL as nvidia-*
# wheels; the node's NVIDIA container toolkit supplies the driver. A CUDA base image would ship a
# second, unused copy of those libraries (GBs), and its Ubuntu 22.04 has no supported Python 3.11;
# rayproject/ray's GPU image adds conda, a devel CUDA and a Ray we would reinstall anyway. One
# image serves CPU-only pods too (torch falls back to CPU without a GPU).
#
# Versions come from pyproject.toml only (tests/test_k8s.py keeps this file in step with it and
# with the RayService's rayVersion). Build: docker build -t captioner:0.1.0 .

ARG PYTHON_VERSION=3.11

# ---- build: a venv with the pinned dependencies, then the project ------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first, from pyproject's own list (same pins), so code changes reuse this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY workers ./workers
COPY deployment ./deployment
RUN pip install --no-cache-dir --no-deps . && pip check

# ---- build-ingest: the slim ingest's venv: every dependency but the inference-only ones -------
# `captioner run` pods (CPU: Kafka, S3, decode/resize, HTTP to the inference tier) import no
# torch, transformers or Ray; pyproject's [tool.captioner] inference-only names what to leave out.
FROM python:${PYTHON_VERSION}-slim-bookworm AS build-ingest
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml ./
RUN python -c "import re, tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); skip = set(p['tool']['captioner']['inference-only']); print('\n'.join(d for d in p['project']['dependencies'] if re.split(r'[\[=<>~! ]', d)[0] not in skip))" > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY workers ./workers
COPY deployment ./deployment
# No `pip check`: the package's metadata lists torch and ray, left out here on purpose. What
# matters is checked instead: the ingest's code path imports without them.
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import sys, workers.runner, workers.replica_http, workers.pipeline; bad = {'torch', 'ray', 'transformers'} & set(sys.modules); sys.exit(f'ingest imports {bad}' if bad else 0)"

# ---- ingest: the slim image of the `captioner run` pods (k8s/base/ingest.yaml) -----------------
#   docker build --target ingest -t captioner-ingest:0.1.0 .
FROM python:${PYTHON_VERSION}-slim-bookworm AS ingest
RUN groupadd --gid 1000 captioner \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/captioner --shell /bin/bash captioner
COPY --from=build-ingest /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/captioner \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER 1000:1000
# 9464 /metrics, 8081 /livez and /readyz.
EXPOSE 9464 8081
CMD ["captioner", "run", "--config", "/etc/captioner/config.yaml"]

# ---- runtime: the GPU image (Ray head and workers); the default target --------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
# The Ray version KubeRay is told (rayVersion) must be the one installed: fail the build if not.
ARG RAY_VERSION=2.60.0
# wget: KubeRay's default Ray pod probes call it. No compilers, no pip cache, no secrets.
# DL3008 (pin apt versions) ignored: Debian point versions vanish from the mirror, which breaks
# rebuilds; the base tag fixes the release and we want its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates wget \
 && rm -rf /var/lib/apt/lists/*
# uid/gid 1000: the pods' runAsUser/fsGroup.
RUN groupadd --gid 1000 captioner \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/captioner --shell /bin/bash captioner
COPY --from=build /opt/venv /opt/venv
# Defaults so `serve run configs/serve.yaml` works in the container as is; Kubernetes mounts the
# ConfigMap over /etc/captioner.
COPY configs/default.yaml /etc/captioner/config.yaml
COPY configs/serve.yaml /app/configs/serve.yaml
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/captioner \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    USE_TF=0 \
    RAY_USAGE_STATS_ENABLED=0
RUN python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')"
WORKDIR /app
USER 1000:1000
# 8000 Serve HTTP, 8080 Ray metrics, 6379/8265/10001 Ray head.
EXPOSE 8000 8080 6379 8265 10001
# No HEALTHCHECK: Kubernetes ignores it; KubeRay's probes and the ingest pods' probes do the job.
CMD ["captioner", "--help"]
