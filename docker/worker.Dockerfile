# syntax=docker/dockerfile:1
# ditmem GPU worker (`ditmem worker`): loads the model once, serves generate/ingest jobs from Redis.
#
#   docker build -f docker/worker.Dockerfile -t ditmem-worker:local .
#
# CUDA base: torch==2.14.1 from PyPI (the build scripts/env.sh tests with) is the CUDA 13.0 build
# (torch.version.cuda == "13.0") and brings its whole CUDA user space as pip packages (cudart,
# cuBLAS, cuDNN 9, NCCL, ...). The image therefore only needs what the NVIDIA Container Toolkit
# keys on, which the small `base` flavour of the matching CUDA release gives: the
# NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES=compute,utility variables (libcuda and
# nvidia-smi are mounted from the host driver) and NVIDIA_REQUIRE_CUDA=cuda>=13.0, so a host whose
# driver is too old for CUDA 13 (older than R580) fails at container start with a clear message
# instead of at the first kernel. `runtime`/`cudnn-runtime` would duplicate ~3 GB of libraries
# torch never loads. faiss-gpu-cu12 (there is no CUDA 13 faiss wheel) brings its own CUDA 12
# cudart/cuBLAS as pip packages; the R580+ driver runs CUDA 12 code too.
# Python 3.11: Ubuntu 24.04 ships 3.12, so the interpreter is a relocatable CPython build
# installed by uv (the same 3.11.14 as the API image). Pin the images by digest where builds must
# be bit-for-bit repeatable.

FROM ghcr.io/astral-sh/uv:0.9.28 AS uv

# -- builder: Python 3.11, a virtualenv with torch (CUDA), faiss-gpu and ditmem ------------------
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1
RUN uv python install 3.11.14 \
 && uv venv --python 3.11.14 /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Exactly the torch build the project is tested with; the constraints keep it in place below.
RUN uv pip install torch==2.14.1 torchvision==0.29.1 \
 && uv pip freeze | grep -E '^(torch|torchvision)==' > /opt/torch-constraints.txt

# Dependencies from pyproject.toml, with faiss-gpu-cu12 in place of faiss-cpu (both provide the
# `faiss` module, so they must never be installed together). A layer that survives source edits.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('faiss-cpu')))" \
        > /tmp/requirements.txt \
 && echo 'faiss-gpu-cu12==1.14.1.post1' >> /tmp/requirements.txt \
 && uv pip install -c /opt/torch-constraints.txt -r /tmp/requirements.txt

# ditmem itself, installed from pyproject; --no-deps: its faiss-cpu requirement is met by
# faiss-gpu-cu12 (same `faiss` module), which `pip check` cannot know.
COPY model ./model
COPY memory_bank ./memory_bank
COPY service ./service
COPY worker ./worker
COPY runtime ./runtime
COPY ditmem ./ditmem
RUN uv pip install --no-deps . \
 && ditmem --help > /dev/null \
 && python -c "import faiss; assert hasattr(faiss, 'StandardGpuResources'), 'faiss without GPU support'"

# -- runtime: interpreter + virtualenv on the CUDA base, as a non-root user ----------------------
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS runtime

# gcc + libc6-dev: Triton (torch.compile on GPU, used for the fused memory-attention merge)
# compiles a small C launcher at run time; without a compiler ditmem falls back to the slower
# eager merge. No FFmpeg packages: the av wheel bundles FFmpeg; the rest of the native
# dependencies (glibc, libstdc++, zlib) are in the Ubuntu base. Not pinned to Ubuntu package
# versions, which the archive drops on every update; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# Same uid/gid (10001) as the API image: both write the shared volumes.
RUN groupadd --system --gid 10001 ditmem \
 && useradd --system --uid 10001 --gid ditmem --create-home --home-dir /home/ditmem ditmem \
 && mkdir -p /data/bank /data/results /data/uploads /data/outputs /run/ditmem-gpus \
 && chown -R ditmem:ditmem /data /run/ditmem-gpus

# Same paths as in the builder: the venv's interpreter links into /opt/python.
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=755 docker/ditmem-gpu.sh /usr/local/bin/ditmem-gpu

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DITMEM_BANK_DIR=/data/bank \
    DITMEM_RESULTS_DIR=/data/results \
    DITMEM_UPLOADS_DIR=/data/uploads \
    DITMEM_OUTPUT_DIR=/data/outputs \
    DITMEM_GPU_LOCK_DIR=/run/ditmem-gpus

WORKDIR /data
# Numeric, so runtimes that enforce non-root (Kubernetes runAsNonRoot) can check it.
USER 10001:10001

# `ditmem-gpu` is `exec ditmem "$@"`; for `ditmem worker` on a container that sees several GPUs it
# first claims one free GPU (a lock per GPU in DITMEM_GPU_LOCK_DIR) and sets CUDA_VISIBLE_DEVICES,
# so `docker compose up --scale worker=N` puts N workers on N different GPUs.
ENTRYPOINT ["ditmem-gpu"]
CMD ["worker"]
