#!/usr/bin/env bash
# Translation speed, qkv against CTranslate2 on the same weights, inputs and machine, in one
# run: the model is exported with `qkv export --format ctranslate2`, then each engine
# translates the test set REPEAT times (beam 4 and greedy, 2 threads; CTranslate2 in batches
# of 32 sentences, qkv in batches of its default 2,048 source tokens, greedy refilled
# continuously in chunks of 256). Both stop an output at the model's
# max_len (qkv: --max-len-a 0 --max-len-b max_len; CTranslate2: max_decoding_length
# max_len - 1), so both do the same work. Prints each run's JSON line, then a markdown table
# of medians with the ratio qkv / CTranslate2 in target tokens/s.
#
# Usage: scripts/bench/translate.sh [MODEL_DIR] [TEST_TSV]
#   defaults: runs/translate-en-es/best data/translate-en-es/test.tsv.gz
# Env: REPEAT (default 3), THREADS (default 2), COMPUTE_TYPES (CTranslate2's, default
# "float32 int8"), QKV_DTYPES (qkv's --dtype, default "f32 int8"), BEAMS (default "4 1").
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-runs/translate-en-es/best}"
data="${2:-data/translate-en-es/test.tsv.gz}"
repeat="${REPEAT:-3}"; threads="${THREADS:-2}"
compute_types="${COMPUTE_TYPES:-float32 int8}"; beams="${BEAMS:-4 1}"
qkv_dtypes="${QKV_DTYPES:-f32 int8}"
PY=$(scripts/venv.sh)
"$PY" -c "import ctranslate2" 2>/dev/null || "$PY" -m pip install -q ctranslate2 >&2
cargo build --release -q -p qkv-cli
qkv=target/release/qkv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$qkv export --model "$model" --format ctranslate2 --out "$work/ct2" 2>/dev/null
max_len=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['max_len'])" "$model/config.json")
lenpen=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('length_penalty', 1.0))" "$model/decode.json")
tgt_tok=()
[ -f "$model/target_tokenizer.json" ] && tgt_tok=(--target-tokenizer "$model/target_tokenizer.json")
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); ISA flags: $(grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | xargs || true)" >&2

for beam in $beams; do
    for i in $(seq "$repeat"); do
        for dt in $qkv_dtypes; do
            $qkv --threads "$threads" bench translate --model "$model" --data "$data" --beam "$beam" \
                --lenpen "$lenpen" --max-len-a 0 --max-len-b "$max_len" --dtype "$dt" | tee -a "$work/lines.jsonl"
        done
        for ct in $compute_types; do
            "$PY" scripts/bench/translate_ct2.py --ct2 "$work/ct2" --tokenizer "$model/tokenizer.json" \
                "${tgt_tok[@]}" --data "$data" --beam "$beam" --lenpen "$lenpen" --threads "$threads" \
                --batch 32 --max-len $((max_len - 1)) --compute-type "$ct" | tee -a "$work/lines.jsonl"
        done
    done
done

"$PY" - "$work/lines.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def key(r):
    if r["impl"] == "qkv":
        return (r["beam"], "qkv" if r["dtype"] == "f32" else "qkv " + r["dtype"])
    return (r["beam"], "ctranslate2 " + r["compute_type"])
groups = {}
for r in rows:
    groups.setdefault(key(r), []).append(r)
print("| beam | engine | seconds | target tokens/s | qkv f32 ÷ this | BLEU | peak RSS (MB) |")
print("|---:|---|---:|---:|---:|---:|---:|")
for (beam, engine), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1].startswith("qkv"), kv[0][1])):
    tps = statistics.median(r["tokens_per_s"] for r in rs)
    qkv = statistics.median(r["tokens_per_s"] for r in groups[(beam, "qkv")])
    print("| %d | %s | %.2f | %.0f | %.2f | %.2f | %.0f |" % (
        beam, engine, statistics.median(r["seconds"] for r in rs), tps, qkv / tps,
        rs[0]["bleu"], max(r["peak_rss_mb"] for r in rs)))
PY
