#!/usr/bin/env bash
# On the GPU machine (no Rust, no network): run what scripts/gpu/build.sh built and carried in
# target/gpu/. CUDA's libraries come from the pip packages beside PyTorch (nvidia-*), the
# driver from the system.
#
# Usage: scripts/gpu/run.sh [tests|bench|translate|all]
#   tests   every test binary, GPU tests required (QKV_REQUIRE_CUDA=1)
#   bench   qkv and PyTorch alternating on the same GPU: the training step's products, the
#           encoder-layer training step, and attention at N 8192 (D 64, 8 heads), one JSON
#           line each
#   translate  the default translation job trained on the GPU for 60 s (TF32, then bf16),
#           validated there and tested on this machine's CPUs (its test BLEU against the CPU
#           run's); then its test set decoded on the GPU and on the CPU (`qkv bench translate
#           --device`: one JSON line each, target tokens/s and BLEU of the same checkpoint)
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

# One failing command does not stop the rest (a device session is short): each failure is
# reported as a JSON line, and the exit status says whether any failed.
status=0
run() {
    "$@" || { status=1; printf '{"failed": "%s"}\n' "$*"; }
}

tests() {
    export QKV_REQUIRE_CUDA=1 QKV_REQUIRE_NVRTC=1
    for t in "$bin"/test-*; do
        echo "== $t"
        run "$t" --test-threads=1
    done
}

bench() {
    # The encoder step's products (B32·T64 = 2048 rows, d 256, ff 1024) and the base model's.
    for shape in "2048 256 768 --tb" "2048 1024 256 --tb" "2048 256 1024 --tb" \
                 "256 2048 768 --ta" "25000 512 2048 --tb"; do
        set -- $shape
        for dtype in f32 bf16; do
            run "$bin/qkv" bench matmul --device cuda --m "$1" --k "$2" --n "$3" ${4:-} --dtype "$dtype"
            run "$py" scripts/gpu/bench_torch.py matmul --m "$1" --k "$2" --n "$3" ${4:-} --dtype "$dtype"
        done
    done
    # Training steps: the encoder layer (issue 18's first target: B32 T64 d256 h8 ff1024)
    # and the paper's base model (6+6 layers, d512, h8, ff2048; 200 x 128 = 25.6k tokens).
    base="--model seq2seq --layers 6 --d-model 512 --heads 8 --d-ff 2048 --batch 200 --seq 128"
    for dtype in f32 bf16; do
        run "$bin/qkv" bench train-step --device cuda --dtype "$dtype" --steps 30 --warmup 5
        run "$py" scripts/gpu/bench_torch.py train-step --batch 32 --dtype "$dtype" --steps 30 --warmup 5
    done
    run "$bin/qkv" bench train-step --device cuda $base --dtype bf16 --steps 10 --warmup 3
    run "$py" scripts/gpu/bench_torch.py train-step $base --dtype bf16 --steps 10 --warmup 3
    for flags in "" "--causal" "--backward" "--causal --backward"; do
        run "$bin/qkv" bench attention --device cuda --n 8192 $flags --steps 5
        run "$bin/qkv" bench attention --device cuda --n 8192 $flags --steps 5 --dtype bf16
        run "$py" scripts/gpu/bench_torch.py attention --n 8192 $flags --steps 5
        run "$py" scripts/gpu/bench_torch.py attention --n 8192 $flags --steps 5 --dtype bf16
    done
}

translate() {
    # Issue 18's fourth target: test BLEU >= the CPU run's with <= 60 s of training.
    local out=${OUT:-runs}
    for config in translate-en-es translate-en-es-bf16; do
        rm -rf "$out/gpu-$config"
        run "$bin/qkv" train --config "configs/$config.json" --device cuda --time-limit 60 \
            --out "$out/gpu-$config"
    done
    local test=data/translate-en-es/test.tsv.gz best="$out/gpu-translate-en-es/best"
    for device in cuda cpu; do
        run "$bin/qkv" bench translate --model "$best" --data "$test" --device "$device"
    done
}

case "${1:-tests}" in
tests) tests ;;
bench) bench ;;
translate) translate ;;
all) tests; bench; translate ;;
*)
    echo "unknown: $1 (tests, bench, translate, all)" >&2
    exit 2
    ;;
esac
exit $status
