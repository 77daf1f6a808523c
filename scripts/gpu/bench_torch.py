"""PyTorch's side of the GPU benchmarks: the same products, attention shapes and encoder
training step as `qkv bench matmul|attention|train-step --device cuda`, one JSON line each, for
scripts/gpu/run.sh.

    python3 scripts/gpu/bench_torch.py matmul --m 2048 --k 256 --n 768 --tb [--dtype bf16]
    python3 scripts/gpu/bench_torch.py attention --n 8192 [--backward] [--causal] [--dtype bf16]
    python3 scripts/gpu/bench_torch.py train-step [--model encoder|seq2seq|lm] [--batch 32
        --seq 64 --d-model 256 --heads 8 --d-ff 1024 --layers 1 --vocab 8000] [--dtype bf16]

train-step is scripts/bench/train_step_torch.py's step (its models and losses, built there) on
the GPU, in eager mode (nn.Transformer's attention is scaled_dot_product_attention): forward,
loss, backward, AdamW(lr=1e-4), zero_grad, with torch.autocast(bfloat16) for --dtype bf16;
each step timed to its completion.

f32 products run in TF32 (torch.backends.cuda.matmul.allow_tf32), as qkv's; attention is
scaled_dot_product_attention, whose backend PyTorch picks (flash for bf16; the
memory-efficient kernel for f32) and names in the line. Times are CUDA-event medians.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import train_step_torch  # noqa: E402  (the CPU benchmark's models, built on the GPU here)


def timed(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["matmul", "attention", "train-step"])
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--n", type=int, default=768)
    p.add_argument("--ta", action="store_true")
    p.add_argument("--tb", action="store_true")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--model", choices=["encoder", "seq2seq", "lm"], default="encoder")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    dev = torch.device("cuda")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    line = {"impl": "torch", "torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    if a.what == "matmul":
        x = torch.randn(a.k, a.m, device=dev, dtype=dtype).t() if a.ta else torch.randn(a.m, a.k, device=dev, dtype=dtype)
        w = torch.randn(a.n, a.k, device=dev, dtype=dtype).t() if a.tb else torch.randn(a.k, a.n, device=dev, dtype=dtype)
        ms, mn = timed(lambda: torch.matmul(x, w), a.steps, a.warmup)
        line.update(m=a.m, k=a.k, n=a.n, ta=a.ta, tb=a.tb,
                    dtype="bf16" if a.dtype == "bf16" else "tf32", ms=round(ms, 4),
                    gflops=round(2 * a.m * a.k * a.n / (ms / 1e3) / 1e9, 1))
    elif a.what == "train-step":
        a.input_grad = False
        model, loss_fn = train_step_torch.build(a, device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms, mn = timed(step, a.steps, a.warmup)
        line.update(model=a.model, batch=a.batch, seq=a.seq, d_model=a.d_model, heads=a.heads,
                    d_ff=a.d_ff, layers=a.layers, dtype=a.dtype, ms_per_step=round(ms, 3),
                    min_ms=round(mn, 3), tokens_per_s=round(a.batch * a.seq / (ms / 1e3)))
    else:
        shape = (a.batch, a.n, a.heads, a.head_dim)
        q, k, v = (torch.randn(shape, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(a.backward) for _ in range(3))
        dout = torch.randn(a.batch, a.heads, a.n, a.head_dim, device=dev, dtype=dtype)

        def step():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=a.causal)
            if a.backward:
                torch.autograd.grad(out, (q, k, v), dout)

        ms, mn = timed(step, a.steps, a.warmup)
        backend = "flash" if dtype == torch.bfloat16 else "efficient (f32 has no flash kernel)"
        line.update(kind="sdpa", backend=backend, n=a.n, heads=a.heads, head_dim=a.head_dim,
                    batch=a.batch, causal=a.causal, backward=a.backward, dtype=a.dtype,
                    ms=round(ms, 3), min_ms=round(mn, 3))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
