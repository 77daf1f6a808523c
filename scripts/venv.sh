#!/usr/bin/env bash
# Shared Python environment for the qkv reference / benchmark scripts.
#
# Usage:
#   PY=$(scripts/venv.sh)          # run it: ensures the venv, prints the python path
#   source scripts/venv.sh         # source it: ensures the venv, sets $QKV_PYTHON
#
# The venv lives at ${QKV_VENV:-${TMPDIR:-/tmp}/qkv-venv}. When its python is
# missing it is created with `python3 -m venv` and torch, numpy, safetensors and
# sacrebleu are installed from PyPI. All installer chatter goes to stderr, so
# stdout carries only the python path.

qkv_venv_python() {
    local venv="${QKV_VENV:-${TMPDIR:-/tmp}/qkv-venv}"
    local py="$venv/bin/python"
    if [ ! -x "$py" ]; then
        echo "venv.sh: creating $venv" >&2
        python3 -m venv "$venv" >&2 || return 1
        "$py" -m pip install --upgrade pip >&2 || true
        "$py" -m pip install torch numpy safetensors sacrebleu tokenizers >&2 || return 1
    elif ! "$py" -c "import torch, numpy, safetensors, sacrebleu, tokenizers" >/dev/null 2>&1; then
        # The venv exists but an earlier install was interrupted: finish it.
        echo "venv.sh: installing missing packages into $venv" >&2
        "$py" -m pip install torch numpy safetensors sacrebleu tokenizers >&2 || return 1
    fi
    echo "$py"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Executed: print the path.
    set -e
    qkv_venv_python
else
    # Sourced: set QKV_PYTHON, print nothing.
    QKV_PYTHON="$(qkv_venv_python)" || return 1
    export QKV_PYTHON
fi
