#!/usr/bin/env bash
# Data-parallel training across two hosts made on this machine: two network namespaces
# (qkv-h0 at 10.77.0.1, qkv-h1 at 10.77.0.2) joined by a veth pair. mpirun runs in qkv-h0 and
# starts the second rank's daemon in qkv-h1 through a launcher that enters that namespace (in
# place of ssh); the ranks talk MPI over TCP on the veth link only (btl self,tcp). The losses
# must equal one process's (relative difference ≤ 1e-5 over 20 updates, dropout on).
#
# Needs root, iproute2, OpenMPI and a qkv built with `--features mpi`:
#   cargo build --release -p qkv-cli --features mpi && sudo scripts/mpi/two_hosts.sh
# Everything it makes (namespaces, veth, the work folder) is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
QKV=${QKV:-$PWD/target/release/qkv}
[ -x "$QKV" ] || { echo "build qkv with --features mpi first ($QKV)" >&2; exit 1; }
command -v ip >/dev/null || { echo "needs iproute2 (ip)" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "needs OpenMPI (mpirun)" >&2; exit 1; }

work=$(mktemp -d /tmp/qkv-two-hosts.XXXXXX)
cleanup() {
    ip netns del qkv-h0 2>/dev/null || true
    ip netns del qkv-h1 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
cleanup_only_ns() { ip netns del qkv-h0 2>/dev/null || true; ip netns del qkv-h1 2>/dev/null || true; }
cleanup_only_ns

ip netns add qkv-h0
ip netns add qkv-h1
ip link add qkv-veth0 type veth peer name qkv-veth1
ip link set qkv-veth0 netns qkv-h0
ip link set qkv-veth1 netns qkv-h1
for i in 0 1; do
    ip netns exec qkv-h$i ip addr add 10.77.0.$((i + 1))/24 dev qkv-veth$i
    ip netns exec qkv-h$i ip link set qkv-veth$i up
    ip netns exec qkv-h$i ip link set lo up
done

# OpenMPI starts remote daemons with `$agent <host> <command…>`; this agent enters the host's
# namespace instead of logging in.
cat > "$work/netns-agent" <<'AGENT'
#!/bin/sh
host=$1; shift
case "$host" in
    10.77.0.1) ns=qkv-h0 ;;
    10.77.0.2) ns=qkv-h1 ;;
    *) echo "netns-agent: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" sh -c "$*"
AGENT
chmod +x "$work/netns-agent"

# A small translation job on the bundled corpus, dropout on.
zcat data/translate-en-es/train.tsv.gz | sed -n 1,3000p > "$work/train.tsv"
zcat data/translate-en-es/valid.tsv.gz | sed -n 1,100p > "$work/valid.tsv"
cat > "$work/job.json" <<JOB
{
  "task": "translate",
  "data": { "train": "$work/train.tsv", "valid": "$work/valid.tsv" },
  "tokenizer": { "vocab_size": 500 },
  "model": { "preset": "tiny", "d_model": 64, "n_heads": 4, "d_ff": 128, "max_len": 128, "dropout": 0.1 },
  "train": {
    "max_steps": 20, "max_tokens": 2000, "accumulate": 2, "valid_every": 10, "save_every": 10,
    "schedule": { "kind": "cosine", "peak": 0.003, "min": 0.0001, "warmup": 3, "total": 20 },
    "seed": 3, "average_last": 1
  },
  "samples": 0
}
JOB

echo "one process (2 threads)…"
timeout 300 "$QKV" --threads 2 train --config "$work/job.json" --out "$work/one" 2>"$work/one.log"

echo "two hosts, one rank each, MPI over TCP on the veth link…"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
timeout 300 ip netns exec qkv-h0 mpirun -n 2 --host 10.77.0.1:1,10.77.0.2:1 \
    --mca plm_rsh_agent "$work/netns-agent" --mca plm_rsh_no_tree_spawn 1 \
    --mca btl self,tcp --mca btl_tcp_if_include 10.77.0.0/24 \
    --mca oob_tcp_if_include 10.77.0.0/24 \
    -x PATH \
    sh -c 'echo "rank $OMPI_COMM_WORLD_RANK on $(ip -4 -o addr show qkv-veth$OMPI_COMM_WORLD_RANK | awk "{print \$4}")" >&2; exec "$0" "$@"' \
    "$QKV" --threads 1 train --config "$work/job.json" --out "$work/two" --mpi-timeout 60 \
    2>"$work/two.log"
grep -E '^rank [01] on|data parallel' "$work/two.log"
stats=/sys/class/net/qkv-veth1/statistics
echo "through the veth link: qkv-h1 received $(ip netns exec qkv-h1 cat $stats/rx_bytes) bytes," \
    "sent $(ip netns exec qkv-h1 cat $stats/tx_bytes)"

python3 - "$work/one/metrics.csv" "$work/two/metrics.csv" <<'PY'
import csv, sys
def losses(p):
    return {(r["step"], r["kind"]): float(r["loss"]) for r in csv.DictReader(open(p))}
one, two = losses(sys.argv[1]), losses(sys.argv[2])
assert one.keys() == two.keys() and len(one) == 22, (len(one), len(two))
worst = max(abs(one[k] - two[k]) / abs(one[k]) for k in one)
print(f"{len(one)} losses (20 updates, 2 validations); largest relative difference {worst:.2e}")
print(f"update 1: {one[('1', 'train')]:.6f} / {two[('1', 'train')]:.6f}; "
      f"update 20: {one[('20', 'train')]:.6f} / {two[('20', 'train')]:.6f}")
sys.exit(0 if worst <= 1e-5 else 1)
PY
echo "two hosts: same trajectory as one process"
