#!/usr/bin/env bash
# Build, here (no CUDA needed), what the GPU machine runs: the stripped `qkv` binary and the
# GPU test binaries, into target/gpu/ — the folder to carry to the device (it has no Rust).
#
# Usage: scripts/gpu/build.sh        then, on the GPU machine: scripts/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/gpu
rm -rf "$out" && mkdir -p "$out"
cargo build --release -p qkv-cli
cp target/release/qkv "$out/qkv"
# The test binaries cargo builds, found by the JSON lines it prints for them.
cargo test --release -p qkv --test cuda --test cuda_compile --no-run --message-format=json \
    | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/test-" + m["target"]["name"])
' "$out"
strip "$out"/*
ls -la "$out" >&2
du -sh "$out" >&2
