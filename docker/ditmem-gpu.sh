#!/usr/bin/env bash
# Entry point of the worker image: `exec ditmem "$@"`, after claiming a GPU of its own.
#
# Docker Compose gives every replica of a service the same device request, so with
# `--scale worker=N` and `count: 1` all N workers would land on GPU 0 (docker/compose#11863).
# The worker service therefore sees all GPUs (`count: all`) and each process takes the first GPU
# nobody else on this host holds: an flock on DITMEM_GPU_LOCK_DIR/<gpu uuid>.lock (a volume shared
# by the replicas), held by the ditmem process for its whole life and released by the kernel when
# it exits, however it exits. CUDA_VISIBLE_DEVICES is then that GPU's UUID, so torch and faiss
# both see only it, as cuda:0.
#
#   worker             must get a GPU of its own: exits with status 75 when all are taken
#   generate, memory   take a free GPU if there is one (`memory retoken` after scaling the
#                      workers down by one), else run with every GPU visible
#   anything else      (doctor, keys, index, serve, --help) claims nothing
# Nothing is claimed when CUDA_VISIBLE_DEVICES is already set or fewer than two GPUs are visible.
set -euo pipefail

lock_dir="${DITMEM_GPU_LOCK_DIR:-/run/ditmem-gpus}"

case "${1:-}" in
    worker) claim=required ;;
    generate | memory) claim=preferred ;;
    *) claim=none ;;
esac

if [[ "$claim" != none && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    gpus=()
    if command -v nvidia-smi > /dev/null; then
        mapfile -t gpus < <(nvidia-smi --query-gpu=uuid --format=csv,noheader 2> /dev/null \
            | tr -d ' \r' | grep -E '^GPU-' || true)
    fi
    if (( ${#gpus[@]} > 1 )); then
        mkdir -p "$lock_dir"
        for gpu in "${gpus[@]}"; do
            exec {lock_fd}> "$lock_dir/$gpu.lock"
            if flock --nonblock "$lock_fd"; then
                export CUDA_VISIBLE_DEVICES="$gpu"
                break
            fi
            exec {lock_fd}>&-
        done
        if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
            echo "ditmem-gpu: ditmem $1 uses GPU $CUDA_VISIBLE_DEVICES" >&2
        elif [[ "$claim" == required ]]; then
            echo "ditmem-gpu: all ${#gpus[@]} GPUs of this host already have a worker" \
                "(locks in $lock_dir); run at most one worker per GPU" >&2
            exit 75  # EX_TEMPFAIL: a GPU may free up
        else
            echo "ditmem-gpu: every GPU has a worker; ditmem $1 shares them" >&2
        fi
    fi
fi

# The lock's file descriptor stays open across exec: the ditmem process holds the GPU.
exec ditmem "$@"
