#!/usr/bin/env python3
"""Time one torch.matmul (CPU, float32) for comparison with `qkv bench matmul`.

    "$(scripts/venv.sh)" scripts/bench/matmul_torch.py --m 2048 --k 256 --n 768 --tb \\
        --threads 2 --steps 20 --warmup 3

The product (m, k) · (k, n) into a preallocated (m, n) output (`out=`), so neither side times
an allocation. --ta: the left operand is stored (k, m) and passed as its transpose view; --tb:
the right one is stored (n, k) (as `x · Wᵀ`), the layouts `qkv bench matmul` takes under the
same flags. Fixed random operands; --steps calls timed one by one after --warmup; prints one
JSON line with the median ms, GFLOP/s at that median, and the instruction set PyTorch's own
kernels dispatch to (MKL follows MKL_ENABLE_INSTRUCTIONS, set by scripts/bench/isa.sh).
"""

import argparse
import json
import statistics
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--ta", action="store_true")
    p.add_argument("--tb", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    lhs = torch.randn(a.k, a.m).t() if a.ta else torch.randn(a.m, a.k)
    rhs = torch.randn(a.n, a.k).t() if a.tb else torch.randn(a.k, a.n)
    out = torch.empty(a.m, a.n)
    for _ in range(a.warmup):
        torch.matmul(lhs, rhs, out=out)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        torch.matmul(lhs, rhs, out=out)
        times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    print(json.dumps({
        "impl": "pytorch", "torch": torch.__version__, "m": a.m, "k": a.k, "n": a.n,
        "ta": a.ta, "tb": a.tb, "threads": a.threads, "dtype": "f32",
        "ms": round(ms, 3), "gflops": round(2 * a.m * a.k * a.n / ms / 1e6, 2),
        "isa": torch.backends.cpu.get_cpu_capability().lower(),
    }))


if __name__ == "__main__":
    main()
