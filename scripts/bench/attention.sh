#!/usr/bin/env bash
# Attention benchmark: qkv's attention kernel vs PyTorch SDPA, same shapes, same thread count.
#
# Usage (from anywhere; build qkv first, this script builds nothing):
#   cargo build --release
#   scripts/bench/attention.sh [--ns "512 2048 8192"] [--causals "no yes"] \
#       [--passes "forward backward"] [--kind flash|linear|window|reference] [--window 256] \
#       [--heads 8] [--head-dim 64] [--batch 1] [--threads 2] [--steps S] [--warmup W] \
#       [--dtype f32|bf16] [--torch-dtype f32|bf16]
#
# Self-attention (Tq = Tk = N) for every N in --ns, causal in --causals (no/yes) and pass in
# --passes (forward = the forward call only, backward = forward + backward). For each
# configuration `${QKV_BIN:-<repo>/target/release/qkv} --threads T bench attention ...` and
# scripts/bench/attention_torch.py (F.scaled_dot_product_attention) run alternately
# RUNS times each (default 3: qkv, torch, qkv, torch, qkv, torch) so both see the same
# machine noise. Without --steps/--warmup: 5 timed calls after 1 warmup for N >= 8192,
# 10 after 2 otherwise. --kind/--window go to qkv only (PyTorch is always full SDPA, so
# linear/window compare against exact attention). --dtype sets both sides' precision (qkv:
# bf16 tile products; PyTorch: bfloat16 tensors), --torch-dtype PyTorch's alone (e.g. qkv bf16
# against PyTorch f32). Per-run JSON lines go to stderr; stdout
# gets one JSON summary line per configuration (median of the per-run medians for each
# side, their ratio qkv/pytorch, the largest peak RSS of each side, every run's number),
# then a markdown table. A run that prints no JSON line (e.g. --kind reference out of
# memory) is reported on stderr, its side shows null, and the script exits 1 at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../venv.sh
source "$ROOT/scripts/venv.sh"   # sets QKV_PYTHON (creates the venv when missing)
source "$ROOT/scripts/bench/isa.sh"   # QKV_ISA: the same instruction set for PyTorch
PY="$QKV_PYTHON"
QKV="${QKV_BIN:-$ROOT/target/release/qkv}"
RUNS="${RUNS:-3}"

declare -A opt=(
    [ns]="512 2048 8192" [causals]="no yes" [passes]="forward backward" [kind]=flash
    [window]="" [heads]=8 [head-dim]=64 [batch]=1 [threads]=2 [steps]="" [warmup]=""
    [dtype]=f32 [torch-dtype]=""
)

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --*=*) key="${1%%=*}"; key="${key#--}"; val="${1#*=}"; shift ;;
        --*)
            key="${1#--}"
            [ $# -ge 2 ] || { echo "attention.sh: $1 needs a value" >&2; exit 2; }
            val="$2"; shift 2 ;;
        *) echo "attention.sh: unexpected argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    [ -n "${opt[$key]+x}" ] || { echo "attention.sh: unknown flag --$key" >&2; exit 2; }
    opt[$key]="$val"
done

case "${opt[kind]}" in
    flash|linear|window|reference) ;;
    *) echo "attention.sh: --kind must be flash, linear, window or reference" >&2; exit 2 ;;
esac
[ -n "${opt[torch-dtype]}" ] || opt[torch-dtype]="${opt[dtype]}"
for d in "${opt[dtype]}" "${opt[torch-dtype]}"; do
    case "$d" in f32|bf16) ;; *) echo "attention.sh: --dtype/--torch-dtype take f32 or bf16, got '$d'" >&2; exit 2 ;; esac
done
for c in ${opt[causals]}; do
    case "$c" in no|yes) ;; *) echo "attention.sh: --causals takes no/yes, got '$c'" >&2; exit 2 ;; esac
done
for p in ${opt[passes]}; do
    case "$p" in forward|backward) ;; *) echo "attention.sh: --passes takes forward/backward, got '$p'" >&2; exit 2 ;; esac
done

if [ ! -x "$QKV" ]; then
    echo "attention.sh: qkv binary not found at $QKV (run 'cargo build --release' or set QKV_BIN)" >&2
    exit 1
fi

# Last line of stdout that looks like a JSON object.
json_line() { grep -E '^[[:space:]]*\{' | tail -n 1; }

qkv_kind=(--kind "${opt[kind]}" --dtype "${opt[dtype]}")
[ -n "${opt[window]}" ] && qkv_kind+=(--window "${opt[window]}")

failed=0
summaries=()
for n in ${opt[ns]}; do
    if [ -n "${opt[steps]}" ]; then steps="${opt[steps]}"; elif [ "$n" -ge 8192 ]; then steps=5; else steps=10; fi
    if [ -n "${opt[warmup]}" ]; then warmup="${opt[warmup]}"; elif [ "$n" -ge 8192 ]; then warmup=1; else warmup=2; fi
    for causal in ${opt[causals]}; do
        for pass in ${opt[passes]}; do
            args=(--n "$n" --heads "${opt[heads]}" --head-dim "${opt[head-dim]}" --batch "${opt[batch]}")
            [ "$causal" = yes ] && args+=(--causal)
            [ "$pass" = backward ] && args+=(--backward)
            args+=(--steps "$steps" --warmup "$warmup")
            tag="n=$n causal=$causal pass=$pass"

            qkv_runs=()
            torch_runs=()
            for ((i = 1; i <= RUNS; i++)); do
                line="$("$QKV" --threads "${opt[threads]}" bench attention "${args[@]}" "${qkv_kind[@]}" | json_line)" || true
                if [ -n "$line" ]; then
                    echo "qkv     $tag run $i: $line" >&2
                    qkv_runs+=("$line")
                else
                    echo "attention.sh: qkv $tag run $i printed no JSON line" >&2
                    failed=1
                fi

                line="$("$PY" "$ROOT/scripts/bench/attention_torch.py" "${args[@]}" --threads "${opt[threads]}" --dtype "${opt[torch-dtype]}" | json_line)" || true
                if [ -n "$line" ]; then
                    echo "pytorch $tag run $i: $line" >&2
                    torch_runs+=("$line")
                else
                    echo "attention.sh: pytorch $tag run $i printed no JSON line" >&2
                    failed=1
                fi
            done

            summary="$({
                printf '%s\n' "$n $causal $pass ${opt[kind]} ${opt[heads]} ${opt[head-dim]} ${opt[batch]} ${opt[threads]} $steps $warmup ${opt[dtype]} ${opt[torch-dtype]}"
                [ ${#qkv_runs[@]} -eq 0 ] || printf 'qkv %s\n' "${qkv_runs[@]}"
                [ ${#torch_runs[@]} -eq 0 ] || printf 'torch %s\n' "${torch_runs[@]}"
            } | "$PY" -c '
import json, statistics, sys

lines = sys.stdin.read().splitlines()
n, causal, pas, kind, heads, head_dim, batch, threads, steps, warmup, dtype, torch_dtype = lines[0].split()
runs = {"qkv": [], "torch": []}
for line in lines[1:]:
    side, js = line.split(" ", 1)
    runs[side].append(json.loads(js))

def side(rs):
    if not rs:
        return None, None, None, []
    ms = [float(r["ms"]) for r in rs]
    rss = [float(r["peak_rss_mb"]) for r in rs if r.get("peak_rss_mb") is not None]
    extra = []
    for r in rs:
        if r.get("extra_mb") is not None:  # qkv: peak - baseline - Q,K,V,O(,dO,dQ,dK,dV)
            extra.append(float(r["extra_mb"]))
        elif r.get("base_rss_mb") is not None and r.get("peak_rss_mb") is not None:
            extra.append(float(r["peak_rss_mb"]) - float(r["base_rss_mb"]))
    return statistics.median(ms), (max(rss) if rss else None), (max(extra) if extra else None), ms

q_ms, q_rss, q_extra, q_all = side(runs["qkv"])
t_ms, t_rss, t_extra, t_all = side(runs["torch"])
summary = {
    "bench": "attention",
    "n": int(n), "causal": causal == "yes", "backward": pas == "backward",
    "kind": kind, "heads": int(heads), "head_dim": int(head_dim), "batch": int(batch),
    "threads": int(threads), "steps": int(steps), "warmup": int(warmup),
    "dtype": dtype, "torch_dtype": torch_dtype,
    "runs": max(len(q_all), len(t_all)),
    "qkv_ms": q_ms, "torch_ms": t_ms,
    "ratio": (q_ms / t_ms) if q_ms is not None and t_ms is not None else None,
    "qkv_peak_rss_mb": q_rss, "torch_peak_rss_mb": t_rss,
    # qkv: memory of the kernel beyond the tensors; torch: peak minus RSS after import.
    "qkv_extra_mb": q_extra, "torch_over_base_mb": t_extra,
    "torch_sdpa_backend": runs["torch"][0].get("sdpa_backend") if runs["torch"] else None,
    "torch": runs["torch"][0].get("torch") if runs["torch"] else None,
    "qkv_runs_ms": q_all, "torch_runs_ms": t_all,
}
print(json.dumps(summary))
')"
            echo "$summary"
            summaries+=("$summary")
        done
    done
done

printf '%s\n' "${summaries[@]}" | "$PY" -c '
import json, sys

rows = [json.loads(l) for l in sys.stdin.read().splitlines() if l.strip()]
if not rows:
    sys.exit(0)
r0 = rows[0]
torch_v = next((r["torch"] for r in rows if r.get("torch")), "?")
backend = next((r["torch_sdpa_backend"] for r in rows if r.get("torch_sdpa_backend")), "?")
print()
print("qkv --kind %s (%s) vs PyTorch %s SDPA (%s, %s), B=%d H=%d D=%d, %d threads, median of %d runs:"
      % (r0["kind"], r0["dtype"], torch_v, backend, r0["torch_dtype"], r0["batch"], r0["heads"],
         r0["head_dim"], r0["threads"], r0["runs"]))
print()
print("| N | causal | pass | qkv ms | PyTorch ms | ratio |")
print("|---:|:---:|:---|---:|---:|---:|")
def fmt(x):
    return "n/a" if x is None else "%.2f" % x
for r in rows:
    print("| %d | %s | %s | %s | %s | %s |" % (
        r["n"], "yes" if r["causal"] else "no", "fwd+bwd" if r["backward"] else "fwd",
        fmt(r["qkv_ms"]), fmt(r["torch_ms"]), fmt(r["ratio"])))
'

exit "$failed"
