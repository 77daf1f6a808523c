#!/usr/bin/env python3
"""Time PyTorch scaled_dot_product_attention (CPU, float32 or bfloat16) for comparison with `qkv bench attention`.

Run from the repository root:

    PY=$(scripts/venv.sh)
    "$PY" scripts/bench/attention_torch.py --n 2048 --heads 8 --head-dim 64 --batch 1 \\
        [--causal] [--backward] [--dtype f32|bf16] --threads 2 --steps 10 --warmup 2

or let scripts/bench/attention.sh run it alternately with qkv.

Self-attention (Tq = Tk = --n) on fixed random q, k, v of shape (batch, heads, n, head_dim),
contiguous (--layout bhnd, the default), in float32 or (--dtype bf16) bfloat16 (SDPA's CPU
flash kernel then computes in bf16 with f32 accumulation). --layout bnhd builds them as (batch, n, heads,
head_dim), the layout qkv's models hold, and passes the transpose(1, 2) views to SDPA, as
nn.MultiheadAttention does. No mask other than is_causal=--causal, dropout 0, default scale
1/sqrt(head_dim).

Forward only (default): each timed call is one F.scaled_dot_product_attention under
torch.no_grad().
--backward: q, k, v require grad; each timed call is the forward plus out.backward(dout)
with a fixed random dout. The grads of q, k, v are set to None before every call, outside
the timed region, so each call computes (and allocates) fresh gradients instead of
accumulating into the previous ones.

After --warmup untimed calls, --steps calls are timed one by one; prints one JSON line
with the median ms, min_ms, peak_rss_mb (getrusage ru_maxrss / 1024), base_rss_mb (the
same, right after importing torch, before the tensors exist) and, where torch exposes
torch._fused_sdp_choice, the SDPA backend it picks for these inputs ("sdpa_backend").
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def sdpa_backend(q, k, v, causal):
    """Name of the backend SDPA dispatches to for these inputs, or None if not detectable."""
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return None
    try:
        idx = int(choice(q, k, v, None, 0.0, causal))
    except Exception:  # private API: signature may change between versions
        return None
    try:
        from torch.nn.attention import SDPBackend
        for name, member in SDPBackend.__members__.items():
            if int(member) == idx:
                # On the CPU, FLASH_ATTENTION is the fused _scaled_dot_product_flash_attention_for_cpu
                # kernel; MATH is the materialized softmax(QK^T)V composite.
                return name.lower()
    except Exception:
        pass
    return str(idx)


def main():
    ap = argparse.ArgumentParser(description="PyTorch SDPA attention benchmark (CPU)")
    ap.add_argument("--n", type=int, required=True, help="sequence length (queries = keys)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--backward", action="store_true",
                    help="time forward + backward instead of forward only")
    ap.add_argument("--layout", choices=["bhnd", "bnhd"], default="bhnd")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if min(a.n, a.heads, a.head_dim, a.batch, a.steps, a.threads) <= 0 or a.warmup < 0:
        ap.error("--n, --heads, --head-dim, --batch, --steps and --threads must be positive")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    B, H, N, D = a.batch, a.heads, a.n, a.head_dim
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32

    def make():
        if a.layout == "bhnd":
            return torch.randn(B, H, N, D, dtype=dtype)
        return torch.randn(B, N, H, D, dtype=dtype)

    leaves = [make() for _ in range(3)]
    if a.backward:
        for t in leaves:
            t.requires_grad_(True)
    dout = torch.randn(B, H, N, D, dtype=dtype)

    def views():
        if a.layout == "bhnd":
            return leaves
        return [t.transpose(1, 2) for t in leaves]

    backend = sdpa_backend(*[t.detach() for t in views()], a.causal)

    if a.backward:
        def call():
            q, k, v = views()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)
            out.backward(dout)

        def reset():
            for t in leaves:
                t.grad = None
    else:
        def call():
            with torch.no_grad():
                q, k, v = views()
                F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)

        def reset():
            pass

    for _ in range(a.warmup):
        reset()
        call()
    times = []
    for _ in range(a.steps):
        reset()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)

    out = {
        "impl": "pytorch",
        # ATen's dispatched instruction set (ATEN_CPU_CAPABILITY may lower it).
        "isa": torch.backends.cpu.get_cpu_capability().lower(),
        "kind": "sdpa",
        "n": N,
        "heads": H,
        "head_dim": D,
        "batch": B,
        "causal": a.causal,
        "backward": a.backward,
        "dtype": a.dtype,
        "layout": a.layout,
        "threads": a.threads,
        "ms": round(statistics.median(times) * 1e3, 3),
        "min_ms": round(min(times) * 1e3, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "base_rss_mb": round(base_rss, 1),
        "steps": a.steps,
        "warmup": a.warmup,
        "sdpa_backend": backend,
        "torch": torch.__version__,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
