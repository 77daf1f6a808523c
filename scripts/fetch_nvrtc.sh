#!/usr/bin/env bash
# Fetch NVRTC (CUDA 13.0, the GPU machine's version) from PyPI, the package
# nvidia-cuda-nvrtc, and print the directory holding libnvrtc.so.13: put it on LD_LIBRARY_PATH
# and tests/cuda_compile.rs compiles every CUDA kernel source, on a machine without a GPU.
#
# Usage: export LD_LIBRARY_PATH=$(scripts/fetch_nvrtc.sh [DEST])${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
#        DEST defaults to target/nvrtc
#
# Nothing is downloaded when DEST already holds it. Needs python3 with pip; the wheel is
# unpacked with python's zipfile. Chatter goes to stderr.
set -euo pipefail
version="13.0.88"
dest="${1:-$(dirname "$0")/../target/nvrtc}"
lib="$dest/nvidia/cu13/lib"
if [ ! -f "$lib/libnvrtc.so.13" ]; then
    mkdir -p "$dest"
    python3 -m pip download --no-deps --disable-pip-version-check \
        "nvidia-cuda-nvrtc==$version" -d "$dest" >&2
    python3 -m zipfile -e "$dest"/nvidia_cuda_nvrtc-"$version"-*.whl "$dest" >&2
    rm -f "$dest"/nvidia_cuda_nvrtc-"$version"-*.whl
fi
cd "$lib" && pwd
