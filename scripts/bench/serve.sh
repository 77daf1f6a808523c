#!/usr/bin/env bash
# Load-test `qkv serve` on loopback: throughput and p50/p99 latency at 1, 8 and 64 concurrent
# clients, with dynamic batching on (--max-batch 32 --batch-window-ms 5) and off
# (--max-batch 1 --batch-window-ms 0). Prints a markdown table for BENCHMARKS.md.
#
# Usage: scripts/bench/serve.sh MODEL_DIR TEXTS_FILE [ENDPOINT]
#   MODEL_DIR   a model directory (e.g. runs/classify-tweets/best)
#   TEXTS_FILE  one input per line; a `label<TAB>text` file uses its text column
#   ENDPOINT    /v1/classify (default), /v1/embed, /v1/translate or /v1/generate
# Env: REQUESTS (per client count, default 400), CLIENTS (default "1 8 64").
set -euo pipefail
cd "$(dirname "$0")/../.."
model="$1"; texts="$2"; endpoint="${3:-/v1/classify}"
requests="${REQUESTS:-400}"
clients_list="${CLIENTS:-1 8 64}"
cargo build --release -q -p qkv-cli
qkv=target/release/qkv
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

field=text
[ "$endpoint" = "/v1/generate" ] && field=prompt
python3 - "$texts" "$field" > "$work/bodies.jsonl" <<'PY'
import json, sys
field = sys.argv[2]
for line in open(sys.argv[1], encoding="utf-8"):
    text = line.rstrip("\n").split("\t")[-1].strip()
    if text:
        body = {field: text}
        if field == "prompt":
            body["max_new_tokens"] = 32
        print(json.dumps(body, ensure_ascii=False))
PY

echo "| batching | clients | requests | throughput (req/s) | p50 (ms) | p99 (ms) | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for mode in on off; do
    if [ "$mode" = on ]; then flags="--max-batch 32 --batch-window-ms 5"; else flags="--max-batch 1 --batch-window-ms 0"; fi
    # shellcheck disable=SC2086
    $qkv serve --model "$model" --addr 127.0.0.1:0 --queue 1024 $flags 2> "$work/serve.log" &
    pid=$!
    for _ in $(seq 100); do grep -q "http://" "$work/serve.log" && break; sleep 0.2; done
    addr=$(grep -o "http://[0-9.:]*" "$work/serve.log" | head -1 | sed 's|http://||')
    [ -n "$addr" ] || { cat "$work/serve.log" >&2; exit 1; }
    for c in $clients_list; do
        # Warm up, then measure.
        $qkv bench serve --addr "$addr" --path "$endpoint" --bodies "$work/bodies.jsonl" --clients "$c" --requests 20 > /dev/null
        line=$($qkv bench serve --addr "$addr" --path "$endpoint" --bodies "$work/bodies.jsonl" --clients "$c" --requests "$requests")
        python3 -c "
import json,sys; r=json.loads(sys.argv[1])
print(f\"| {sys.argv[2]} | {r['clients']} | {r['requests']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |\")" "$line" "$mode"
    done
    kill -TERM "$pid"; wait "$pid" || true
done
