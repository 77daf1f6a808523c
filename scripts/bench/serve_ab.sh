#!/usr/bin/env bash
# Same-run `qkv serve` throughput of two binaries (e.g. before and after a change) on
# translation requests of JOIN consecutive source lines each, at CLIENTS concurrent clients,
# ROUNDS rounds alternating the binaries. Prints one JSON line per run.
#
# Usage: scripts/bench/serve_ab.sh QKV_BEFORE QKV_AFTER [MODEL_DIR] [TEST_TSV]
#   defaults: runs/translate-en-es/best data/translate-en-es/test.tsv.gz
# Env: JOIN (default 4), CLIENTS (default 64), REQUESTS (default 400), ROUNDS (default 2).
set -euo pipefail
before="$1"; after="$2"
model="${3:-runs/translate-en-es/best}"; data="${4:-data/translate-en-es/test.tsv.gz}"
join="${JOIN:-4}"; clients="${CLIENTS:-64}"; requests="${REQUESTS:-400}"; rounds="${ROUNDS:-2}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
zcat -f "$data" | cut -f1 | python3 -c "
import json, sys
lines = [l.strip() for l in sys.stdin if l.strip()]
for i in range(0, len(lines) - $join + 1, $join):
    print(json.dumps({'text': ' '.join(lines[i:i + $join])}, ensure_ascii=False))
" > "$work/bodies.jsonl"
for round in $(seq "$rounds"); do
    for bin in "$before" "$after"; do
        "$bin" serve --model "$model" --addr 127.0.0.1:0 --queue 1024 --max-batch 32 \
            --batch-window-ms 5 2> "$work/serve.log" &
        pid=$!
        for _ in $(seq 100); do grep -q "http://" "$work/serve.log" && break; sleep 0.2; done
        addr=$(grep -o "http://[0-9.:]*" "$work/serve.log" | head -1 | sed 's|http://||')
        [ -n "$addr" ] || { cat "$work/serve.log" >&2; exit 1; }
        "$after" bench serve --addr "$addr" --path /v1/translate --bodies "$work/bodies.jsonl" \
            --clients "$clients" --requests 20 > /dev/null
        echo "{\"binary\": \"$bin\", \"round\": $round, \"result\": $("$after" bench serve --addr "$addr" \
            --path /v1/translate --bodies "$work/bodies.jsonl" --clients "$clients" --requests "$requests")}"
        kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    done
done
