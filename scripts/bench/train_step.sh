#!/usr/bin/env bash
# Training-step benchmark: qkv vs PyTorch on the same shape, same thread count.
#
# Usage (from anywhere; build qkv first, this script builds nothing):
#   cargo build --release
#   scripts/bench/train_step.sh [--model encoder|seq2seq|lm] [--batch 32] [--seq 64] \
#       [--d-model 256] [--heads 8] [--d-ff 1024] [--layers 1] [--threads 2] \
#       [--vocab 8000] [--steps 30] [--warmup 5]
#
# Flags not given take the defaults shown; the full, explicit flag list is passed to
# both `${QKV_BIN:-<repo>/target/release/qkv} bench train-step` and
# scripts/bench/train_step_torch.py, which run alternately RUNS times each
# (default 3: qkv, torch, qkv, torch, qkv, torch) so both see the same machine noise.
# Each run prints one JSON line with ms_per_step (median over its timed steps),
# tokens_per_s and peak_rss_mb. This script prints one JSON summary line (median of
# the per-run medians for each side, their ratio qkv/pytorch, the largest peak RSS of
# each side, and every run's number) and then one human-readable line.
# Per-run JSON lines go to stderr.
#
# The encoder's random input needs no gradient on either side (PyTorch: requires_grad
# False, so autograd skips the in-projection's input-gradient product, and qkv skips it
# too); INPUT_GRAD=1 makes both sides compute it.
#
# QKV_DTYPE=bf16 times qkv's mixed-precision step (bf16 matrix operands, f32 sums and
# weights) against PyTorch's float32 step: the issue's "bf16 step vs PyTorch's f32 step".
#
# QKV_BIN_B=<another qkv binary> times a second build in the same rounds (A, B, PyTorch,
# A, B, PyTorch, …): a before/after comparison of a change, each side also against PyTorch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../venv.sh
source "$ROOT/scripts/venv.sh"   # sets QKV_PYTHON (creates the venv when missing)
source "$ROOT/scripts/bench/isa.sh"   # QKV_ISA: the same instruction set for PyTorch
PY="$QKV_PYTHON"
QKV="${QKV_BIN:-$ROOT/target/release/qkv}"
RUNS="${RUNS:-3}"
QKV_DTYPE="${QKV_DTYPE:-f32}"
extra=()
[ "${INPUT_GRAD:-0}" = 1 ] && extra=(--input-grad)

declare -A opt=(
    [model]=encoder [batch]=32 [seq]=64 [d-model]=256 [heads]=8 [d-ff]=1024
    [layers]=1 [threads]=2 [vocab]=8000 [steps]=30 [warmup]=5
)
order=(model batch seq d-model heads d-ff layers threads vocab steps warmup)

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --*=*) key="${1%%=*}"; key="${key#--}"; val="${1#*=}"; shift ;;
        --*)
            key="${1#--}"
            [ $# -ge 2 ] || { echo "train_step.sh: $1 needs a value" >&2; exit 2; }
            val="$2"; shift 2 ;;
        *) echo "train_step.sh: unexpected argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    [ -n "${opt[$key]+x}" ] || { echo "train_step.sh: unknown flag --$key" >&2; exit 2; }
    opt[$key]="$val"
done

args=()
for k in "${order[@]}"; do args+=("--$k" "${opt[$k]}"); done
args+=("${extra[@]}")

if [ ! -x "$QKV" ]; then
    echo "train_step.sh: qkv binary not found at $QKV (run 'cargo build --release' or set QKV_BIN)" >&2
    exit 1
fi

# Last line of stdout that looks like a JSON object.
json_line() { grep -E '^[[:space:]]*\{' | tail -n 1; }

qkv_runs=()
b_runs=()
torch_runs=()
for ((i = 1; i <= RUNS; i++)); do
    line="$("$QKV" bench train-step "${args[@]}" --dtype "$QKV_DTYPE" | json_line)" || true
    [ -n "$line" ] || { echo "train_step.sh: qkv run $i printed no JSON line" >&2; exit 1; }
    echo "qkv     run $i: $line" >&2
    qkv_runs+=("$line")

    if [ -n "${QKV_BIN_B:-}" ]; then
        line="$("$QKV_BIN_B" bench train-step "${args[@]}" --dtype "$QKV_DTYPE" | json_line)" || true
        [ -n "$line" ] || { echo "train_step.sh: QKV_BIN_B run $i printed no JSON line" >&2; exit 1; }
        echo "qkv B   run $i: $line" >&2
        b_runs+=("$line")
    fi

    line="$("$PY" "$ROOT/scripts/bench/train_step_torch.py" "${args[@]}" | json_line)" || true
    [ -n "$line" ] || { echo "train_step.sh: pytorch run $i printed no JSON line" >&2; exit 1; }
    echo "pytorch run $i: $line" >&2
    torch_runs+=("$line")
done

{
    printf '%s\n' "${opt[model]} ${opt[batch]} ${opt[seq]} ${opt[d-model]} ${opt[heads]} ${opt[d-ff]} ${opt[layers]} ${opt[threads]} ${opt[vocab]} $QKV_DTYPE"
    printf 'qkv %s\n' "${qkv_runs[@]}"
    [ ${#b_runs[@]} -eq 0 ] || printf 'b %s\n' "${b_runs[@]}"
    printf 'torch %s\n' "${torch_runs[@]}"
} | "$PY" -c '
import json, statistics, sys

lines = sys.stdin.read().splitlines()
model, batch, seq, d_model, heads, d_ff, layers, threads, vocab, qkv_dtype = lines[0].split()
runs = {"qkv": [], "b": [], "torch": []}
for line in lines[1:]:
    side, js = line.split(" ", 1)
    runs[side].append(json.loads(js))

def side(rs):
    ms = [float(r["ms_per_step"]) for r in rs]
    tps = [float(r["tokens_per_s"]) for r in rs]
    rss = [float(r["peak_rss_mb"]) for r in rs]
    return statistics.median(ms), statistics.median(tps), max(rss), ms

q_ms, q_tps, q_rss, q_all = side(runs["qkv"])
t_ms, t_tps, t_rss, t_all = side(runs["torch"])
q_dtype = runs["qkv"][0].get("dtype", qkv_dtype)
summary = {
    "bench": "train-step",
    "model": model, "batch": int(batch), "seq": int(seq), "d_model": int(d_model),
    "heads": int(heads), "d_ff": int(d_ff), "layers": int(layers),
    "threads": int(threads), "vocab": int(vocab), "runs": len(q_all),
    "qkv_dtype": q_dtype, "pytorch_dtype": "f32",
    "qkv_ms_per_step": q_ms, "pytorch_ms_per_step": t_ms,
    "ratio_qkv_over_pytorch": q_ms / t_ms,
    "qkv_tokens_per_s": q_tps, "pytorch_tokens_per_s": t_tps,
    "qkv_peak_rss_mb": q_rss, "pytorch_peak_rss_mb": t_rss,
    "qkv_runs_ms": q_all, "pytorch_runs_ms": t_all,
}
if runs["b"]:
    b_ms, b_tps, b_rss, b_all = side(runs["b"])
    summary.update({
        "qkv_b_ms_per_step": b_ms, "ratio_b_over_pytorch": b_ms / t_ms,
        "ratio_b_over_a": b_ms / q_ms, "qkv_b_runs_ms": b_all,
    })
print(json.dumps(summary))
if runs["b"]:
    print(f"qkv B {b_ms:.1f} ms/step | B/pytorch = {b_ms / t_ms:.3f} | B/A = {b_ms / q_ms:.3f}")
print(
    f"train-step {model} B={batch} T={seq} C={d_model} H={heads} F={d_ff} L={layers} "
    f"threads={threads}: qkv ({q_dtype}) {q_ms:.1f} ms/step ({q_tps:,.0f} tok/s, {q_rss:.0f} MB) | "
    f"pytorch {t_ms:.1f} ms/step ({t_tps:,.0f} tok/s, {t_rss:.0f} MB) | "
    f"qkv/pytorch = {q_ms / t_ms:.3f}"
)
'
