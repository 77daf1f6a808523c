#!/usr/bin/env bash
# Matrix products: `qkv bench matmul` against torch.matmul (MKL), same shapes, same threads.
#
# Usage (from anywhere; build qkv first, this script builds nothing):
#   cargo build --release
#   scripts/bench/matmul.sh [--shapes "2048x256x768:tb 2048x768x256 256x2048x768:ta"] \
#       [--threads 2] [--steps 20] [--warmup 3]
#
# A shape is MxKxN: the product (M, K) · (K, N); ":ta" stores the left operand as (K, M),
# ":tb" the right one as (N, K) (a weight, as `x · Wᵀ`). The default shapes are the encoder
# step's (B 32, T 64, d 256, ff 1024): x·Wᵀ for the Q/K/V, output, FFN up and FFN down
# projections, the input gradients dy·W, the weight gradients dyᵀ·x, and one large product.
# For each shape qkv and scripts/bench/matmul_torch.py run alternately RUNS times each
# (default 3), so both see the same machine noise. QKV_ISA (baseline|avx2|avx512) holds both
# sides to one instruction set (scripts/bench/isa.sh). Per-run JSON lines go to stderr;
# stdout gets one JSON summary per shape (median GFLOP/s of each side over its runs, ratio
# qkv/pytorch: above 1 is qkv faster), then a markdown table.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../venv.sh
source "$ROOT/scripts/venv.sh"   # sets QKV_PYTHON (creates the venv when missing)
source "$ROOT/scripts/bench/isa.sh"
PY="$QKV_PYTHON"
QKV="${QKV_BIN:-$ROOT/target/release/qkv}"
RUNS="${RUNS:-3}"

shapes="2048x256x768:tb 2048x256x256:tb 2048x256x1024:tb 2048x1024x256:tb 2048x768x256 2048x256x256 2048x1024x256 2048x256x1024 256x2048x768:ta 256x2048x256:ta 1024x2048x256:ta 256x2048x1024:ta 2048x1024x1024:tb"
threads=2 steps=20 warmup=3
usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --shapes|--threads|--steps|--warmup)
            [ $# -ge 2 ] || { echo "matmul.sh: $1 needs a value" >&2; exit 2; }
            declare "${1#--}=$2"; shift 2 ;;
        *) echo "matmul.sh: unexpected argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
if [ ! -x "$QKV" ]; then
    echo "matmul.sh: qkv binary not found at $QKV (run 'cargo build --release' or set QKV_BIN)" >&2
    exit 1
fi

json_line() { grep -E '^[[:space:]]*\{' | tail -n 1; }
failed=0
summaries=()
for shape in $shapes; do
    dims="${shape%%:*}"; flag=""
    [ "$dims" = "$shape" ] || flag="${shape#*:}"
    if ! [[ "$flag" =~ ^(|ta|tb)$ ]] || ! [[ "$dims" =~ ^([0-9]+)x([0-9]+)x([0-9]+)$ ]]; then
        echo "matmul.sh: bad shape '$shape' (expected MxKxN, optionally :ta or :tb)" >&2; exit 2
    fi
    args=(--m "${BASH_REMATCH[1]}" --k "${BASH_REMATCH[2]}" --n "${BASH_REMATCH[3]}" --steps "$steps" --warmup "$warmup")
    [ -z "$flag" ] || args+=("--$flag")
    runs=()
    for ((i = 1; i <= RUNS; i++)); do
        for side in qkv torch; do
            if [ "$side" = qkv ]; then
                line="$("$QKV" --threads "$threads" bench matmul "${args[@]}" | json_line)" || true
            else
                line="$("$PY" "$ROOT/scripts/bench/matmul_torch.py" "${args[@]}" --threads "$threads" | json_line)" || true
            fi
            if [ -n "$line" ]; then
                echo "$side $shape run $i: $line" >&2
                runs+=("$side $line")
            else
                echo "matmul.sh: $side $shape run $i printed no JSON line" >&2
                failed=1
            fi
        done
    done
    summary="$(printf '%s\n' "$shape" "${runs[@]}" | "$PY" -c '
import json, statistics, sys
lines = sys.stdin.read().splitlines()
runs = {"qkv": [], "torch": []}
for l in lines[1:]:
    side, js = l.split(" ", 1)
    runs[side].append(json.loads(js))
def med(rs):
    return statistics.median(r["gflops"] for r in rs) if rs else None
q, t = med(runs["qkv"]), med(runs["torch"])
print(json.dumps({
    "bench": "matmul", "shape": lines[0],
    "qkv_gflops": q, "torch_gflops": t, "ratio_qkv_over_torch": q / t if q and t else None,
    "qkv_isa": runs["qkv"][0]["isa"] if runs["qkv"] else None,
    "torch_isa": runs["torch"][0]["isa"] if runs["torch"] else None,
    "torch": runs["torch"][0]["torch"] if runs["torch"] else None,
    "qkv_runs_gflops": [r["gflops"] for r in runs["qkv"]],
    "torch_runs_gflops": [r["gflops"] for r in runs["torch"]],
}))
')"
    echo "$summary"
    summaries+=("$summary")
done

printf '%s\n' "${summaries[@]}" | "$PY" -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin.read().splitlines() if l.strip()]
if not rows:
    sys.exit(0)
print()
print("qkv (%s) vs PyTorch %s torch.matmul (%s), f32, %s threads, GFLOP/s, median of runs:"
      % (rows[0]["qkv_isa"], rows[0]["torch"], rows[0]["torch_isa"], sys.argv[1]))
print()
print("| product | qkv | PyTorch | qkv / PyTorch |")
print("|---|---:|---:|---:|")
f = lambda x: "n/a" if x is None else "%.1f" % x
for r in rows:
    ratio = "n/a" if r["ratio_qkv_over_torch"] is None else "%.2f" % r["ratio_qkv_over_torch"]
    print("| %s | %s | %s | %s |" % (r["shape"], f(r["qkv_gflops"]), f(r["torch_gflops"]), ratio))
' "$threads"
exit "$failed"
