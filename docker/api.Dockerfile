# syntax=docker/dockerfile:1
# ditmem HTTP API (`ditmem serve`), CPU only. The same image runs the CPU worker of the compose
# `cpu` profile (tiny preset) and one-off CLI commands (`ditmem keys new`, `ditmem index rebuild`).
#
#   docker build -f docker/api.Dockerfile -t ditmem-api:local .
#
# Base images are pinned by version; pin by digest too (python:3.11.14-slim-bookworm@sha256:...)
# where builds must be bit-for-bit repeatable.

# -- builder: a virtualenv with CPU-only torch, the dependencies and ditmem itself ----------------
FROM python:3.11.14-slim-bookworm AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The torch build the project is tested with (scripts/env.sh), as its CPU-only wheels: the API
# never runs the model on a GPU, and the CUDA wheels would add several GB. --index-url (not
# --extra-index-url): nothing else can come from that index, and no CUDA build from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1 \
 && pip freeze | grep -E '^(torch|torchvision)==' > /opt/torch-constraints.txt

# Dependencies first (a layer that survives source edits), read from pyproject.toml; the
# constraints keep the CPU torch above from being replaced by a PyPI (CUDA) build.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -c /opt/torch-constraints.txt -r /tmp/requirements.txt

# ditmem itself, installed from pyproject (setuptools: model*, memory_bank*, runtime*, service*, worker*, ditmem*).
COPY model ./model
COPY memory_bank ./memory_bank
COPY service ./service
COPY worker ./worker
COPY runtime ./runtime
COPY ditmem ./ditmem
RUN pip install --no-deps . \
 && ditmem --help > /dev/null

# -- runtime: the virtualenv on a clean slim image, as a non-root user ----------------------------
FROM python:3.11.14-slim-bookworm AS runtime

# No apt packages: the av wheel bundles FFmpeg (libavcodec, libx264, ...), torch and faiss-cpu
# bundle their OpenMP/BLAS; what is left (glibc, libstdc++, libgcc_s, zlib) is in the slim base.

# One fixed uid/gid (10001) in the API and worker images: both write the shared bank, results and
# uploads volumes (and NFS exports on other hosts), so the owner must be the same everywhere.
RUN groupadd --system --gid 10001 ditmem \
 && useradd --system --uid 10001 --gid ditmem --create-home --home-dir /home/ditmem ditmem \
 && mkdir -p /data/bank /data/results /data/uploads /data/outputs \
 && chown -R ditmem:ditmem /data

COPY --from=builder /opt/venv /opt/venv

# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: as scripts/run, nothing is ever fetched from a model hub.
# Storage paths are absolute so a named volume (or NFS mount) on /data/* holds them.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DITMEM_HOST=0.0.0.0 \
    DITMEM_PORT=8000 \
    DITMEM_BANK_DIR=/data/bank \
    DITMEM_RESULTS_DIR=/data/results \
    DITMEM_UPLOADS_DIR=/data/uploads \
    DITMEM_OUTPUT_DIR=/data/outputs

WORKDIR /data
# Numeric, so runtimes that enforce non-root (Kubernetes runAsNonRoot) can check it.
USER 10001:10001
EXPOSE 8000

# Liveness only (the process answers); compose checks readiness (/readyz) instead. No curl in the
# slim image: Python's urllib does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DITMEM_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["ditmem"]
CMD ["serve"]
