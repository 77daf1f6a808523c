#!/usr/bin/env bash
# On the GPU machine (no Rust, no network): run what scripts/gpu/build.sh built and carried in
# target/gpu/. CUDA's libraries come from the pip packages beside PyTorch (nvidia-*), the
# driver from the system.
#
# Usage: scripts/gpu/run.sh [tests]      prints the device, then each test binary's results
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/gpu
[ -x "$bin/qkv" ] || { echo "target/gpu/qkv missing: run scripts/gpu/build.sh here and carry target/gpu" >&2; exit 1; }

# Every lib directory of the pip NVIDIA packages (nvidia/cu13/lib holds NVRTC and cuBLAS).
py=${PYTHON:-python3}
libs=$("$py" - <<'PY'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
roots = [p for p in nvidia.__path__]
dirs = sorted({os.path.dirname(f) for r in roots for f in glob.glob(r + "/**/lib*.so*", recursive=True)})
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

what=${1:-tests}
case "$what" in
tests)
    export QKV_REQUIRE_CUDA=1 QKV_REQUIRE_NVRTC=1
    status=0
    for t in "$bin"/test-*; do
        echo "== $t"
        "$t" --test-threads=1 || status=1
    done
    exit $status
    ;;
*)
    echo "unknown: $what (tests)" >&2
    exit 2
    ;;
esac
