#!/usr/bin/env bash
# Data-parallel throughput on one machine: 2 ranks × 1 thread (mpirun) against 1 rank ×
# 2 threads, training the default job's model (configs/translate-en-es.json: its data,
# tokenizer, model and batches) for UPDATES updates without a time limit, alternating
# RUNS times so both see the same machine drift. Each run is profiled (QKV_PROFILE=1) for the
# gradient all-reduce and the wait for the slower rank.
#
# Usage: cargo build --release -p qkv-cli --features mpi
#        [RUNS=2] [UPDATES=60] [CONFIG=configs/translate-en-es.json] scripts/bench/data_parallel.sh
# Prints one JSON line per run and a summary: seconds per update over updates 11..UPDATES
# (the first ones allocate), target tokens/s, the ratio 2×1 / 1×2, and the all-reduce.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
QKV="${QKV_BIN:-$ROOT/target/release/qkv}"
RUNS="${RUNS:-2}"
UPDATES="${UPDATES:-60}"
CONFIG="${CONFIG:-$ROOT/configs/translate-en-es.json}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 QKV_PROFILE=1
work=$(mktemp -d /tmp/qkv-dp-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The job without a time limit, validation, checkpoints or test (data paths made absolute).
python3 - "$CONFIG" "$UPDATES" > "$work/job.json" <<'PY'
import json, os, sys
path, updates = sys.argv[1], int(sys.argv[2])
job = json.load(open(path))
base = os.path.dirname(os.path.abspath(path))
for k in list(job["data"]):
    if k == "test":
        del job["data"][k]
    elif isinstance(job["data"][k], str):
        job["data"][k] = os.path.normpath(os.path.join(base, job["data"][k]))
job["train"].update(time_limit_s=None, max_steps=updates, valid_every=0, save_every=0,
                    average_last=1)
job.pop("out", None)
print(json.dumps(job))
PY

one_run() { # name, command…
    local name=$1; shift
    rm -rf "$work/$name"
    "$@" train --config "$work/job.json" --out "$work/$name" 2> "$work/$name.log" >/dev/null
    python3 - "$work/$name" "$name" <<'PY'
import csv, json, re, sys
run, name = sys.argv[1], sys.argv[2]
rows = [r for r in csv.DictReader(open(f"{run}/metrics.csv")) if r["kind"] == "train"]
el = [float(r["elapsed_s"]) for r in rows]
s_per_update = (el[-1] - el[9]) / (len(el) - 10)
prof = {}
for line in open(f"{run}.log"):
    m = re.match(r"\s*([\d.]+) ms/step\s+\S+ calls/step\s+(.*)$", line)
    if m:
        prof[m.group(2)] = float(m.group(1))
print(json.dumps({"run": name, "s_per_update": round(s_per_update, 4),
                  "allreduce_ms": prof.get("gradient all-reduce (after the backward)"),
                  "wait_ms": prof.get("waiting for the other ranks"),
                  "updates": len(rows)}))
PY
}

for r in $(seq "$RUNS"); do
    one_run "threads-$r" "$QKV" --threads 2 | tee -a "$work/runs.jsonl"
    one_run "ranks-$r" mpirun -n 2 "$QKV" --threads 1 | tee -a "$work/runs.jsonl"
done

python3 - "$work" "$RUNS" <<'PY'
import csv, json, statistics, sys
work, runs = sys.argv[1], int(sys.argv[2])
res = [json.loads(l) for l in open(f"{work}/runs.jsonl")]
rows = [r for r in csv.DictReader(open(f"{work}/threads-1/metrics.csv")) if r["kind"] == "train"]
# Target tokens/s as the trainer logged it (rank 0: the whole update's tokens), updates 11...
tps = lambda name: statistics.median(float(r["tokens_per_s"]) for r in csv.DictReader(open(f"{work}/{name}/metrics.csv")) if r["kind"] == "train" and int(r["step"]) > 10)
a = [r for r in res if r["run"].startswith("threads")]
b = [r for r in res if r["run"].startswith("ranks")]
sa = statistics.median(r["s_per_update"] for r in a)
sb = statistics.median(r["s_per_update"] for r in b)
# Each round's two runs saw the same machine: the ratio per round, then its median.
ratios = [x["s_per_update"] / y["s_per_update"] for x, y in zip(a, b)]
out = {"one_rank_two_threads_s_per_update": sa, "two_ranks_one_thread_s_per_update": sb,
       "speed_ratio_two_ranks_over_threads": round(statistics.median(ratios), 3),
       "round_ratios": [round(r, 3) for r in ratios],
       "tokens_per_s_threads": round(statistics.median(tps(r["run"]) for r in a)),
       "tokens_per_s_ranks": round(statistics.median(tps(r["run"]) for r in b)),
       "allreduce_ms": statistics.median(r["allreduce_ms"] for r in b),
       "wait_for_slower_rank_ms": statistics.median(r["wait_ms"] for r in b), "runs": res}
print(json.dumps(out))
print(f"2 ranks × 1 thread: {sb:.3f} s/update; 1 rank × 2 threads: {sa:.3f} s/update; "
      f"2×1 is {out['speed_ratio_two_ranks_over_threads']:.2f}× the speed of 1×2 (median of the rounds' ratios {out['round_ratios']}); gradient all-reduce {out['allreduce_ms']:.1f} ms/update, "
      f"waiting for the slower rank {out['wait_for_slower_rank_ms']:.1f} ms/update")
PY
