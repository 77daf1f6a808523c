#!/usr/bin/env python3
"""Time one PyTorch training step (CPU, float32) for comparison with `qkv bench train-step`.

Run from the repository root:

    PY=$(scripts/venv.sh)
    "$PY" scripts/bench/train_step_torch.py --model encoder --batch 32 --seq 64 \\
        --d-model 256 --heads 8 --d-ff 1024 --layers 1 --threads 2 --vocab 8000 \\
        --steps 30 --warmup 5

or let scripts/bench/train_step.sh run it alternately with qkv.

Models (dropout 0, post-LN, ReLU, batch_first):
  encoder  nn.TransformerEncoder(--layers x TransformerEncoderLayer) on a fixed random
           (B,T,C) input, loss = MSE against a fixed random target.
  seq2seq  src/tgt embeddings * sqrt(C) + sinusoidal positions, nn.Transformer
           (--layers encoder and decoder layers) with a causal target mask, bias-free
           output Linear(C, vocab), cross-entropy (label_smoothing 0.1); src and tgt
           length = --seq.
  lm       embedding + sinusoidal positions, nn.TransformerEncoder with a causal mask,
           bias-free output Linear(C, vocab), cross-entropy (label_smoothing 0.1).

A step is forward + loss + backward + AdamW(lr=1e-4).step() + zero_grad(set_to_none=True).
After --warmup untimed steps, --steps steps are timed one by one; prints one JSON line
with the median ms_per_step, tokens_per_s = batch*seq / median seconds, peak_rss_mb
(getrusage ru_maxrss / 1024) and base_rss_mb (the same, measured right after importing
torch, before the model is built).
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal(T, C):
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    two_i = torch.arange(0, C, 2, dtype=torch.float32)
    ang = pos / torch.pow(10000.0, two_i / C)
    P = torch.zeros(T, C)
    P[:, 0::2] = torch.sin(ang)
    P[:, 1::2] = torch.cos(ang)
    return P


def causal_mask(T):
    # Float mask (0 / -inf), the form nn.Transformer.generate_square_subsequent_mask gives.
    return nn.Transformer.generate_square_subsequent_mask(T)


class Seq2Seq(nn.Module):
    def __init__(self, a):
        super().__init__()
        C = a.d_model
        self.scale = math.sqrt(C)
        self.src_embed = nn.Embedding(a.vocab, C)
        self.tgt_embed = nn.Embedding(a.vocab, C)
        self.transformer = nn.Transformer(
            d_model=C, nhead=a.heads, num_encoder_layers=a.layers,
            num_decoder_layers=a.layers, dim_feedforward=a.d_ff, dropout=0.0,
            activation="relu", batch_first=True, norm_first=False)
        self.output = nn.Linear(C, a.vocab, bias=False)
        self.register_buffer("pos", sinusoidal(a.seq, C), persistent=False)
        self.register_buffer("mask", causal_mask(a.seq), persistent=False)

    def forward(self, src, tgt_in):
        s = self.src_embed(src) * self.scale + self.pos[: src.shape[1]]
        t = self.tgt_embed(tgt_in) * self.scale + self.pos[: tgt_in.shape[1]]
        h = self.transformer(s, t, tgt_mask=self.mask, tgt_is_causal=True)
        return self.output(h)


class LM(nn.Module):
    def __init__(self, a):
        super().__init__()
        C = a.d_model
        self.embed = nn.Embedding(a.vocab, C)
        layer = nn.TransformerEncoderLayer(
            C, a.heads, a.d_ff, dropout=0.0, activation="relu", batch_first=True,
            norm_first=False)
        self.layers = nn.TransformerEncoder(layer, a.layers, enable_nested_tensor=False)
        self.output = nn.Linear(C, a.vocab, bias=False)
        self.register_buffer("pos", sinusoidal(a.seq, C), persistent=False)
        self.register_buffer("mask", causal_mask(a.seq), persistent=False)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.layers(h, mask=self.mask, is_causal=True)
        return self.output(h)


def build(a, device="cpu"):
    """Returns (model, loss_fn) where loss_fn() runs the forward pass and the loss; the model
    and its data on `device` (scripts/gpu/bench_torch.py builds the same models on the GPU)."""
    B, T, C, V = a.batch, a.seq, a.d_model, a.vocab
    randn = lambda *shape, **kw: torch.randn(*shape, device=device, **kw)  # noqa: E731
    randint = lambda hi, shape: torch.randint(1, hi, shape, device=device)  # noqa: E731
    if a.model == "encoder":
        layer = nn.TransformerEncoderLayer(
            C, a.heads, a.d_ff, dropout=0.0, activation="relu", batch_first=True,
            norm_first=False)
        model = nn.TransformerEncoder(layer, a.layers, enable_nested_tensor=False).to(device)
        # Without --input-grad, x does not require grad and autograd skips the in-projection's
        # input-gradient product (7 matrix products in backward instead of 8).
        x = randn(B, T, C, requires_grad=a.input_grad)
        target = randn(B, T, C)

        def loss_fn():
            x.grad = None
            return F.mse_loss(model(x), target)
        return model, loss_fn
    if a.model == "seq2seq":
        model = Seq2Seq(a).to(device)
        src = randint(V, (B, T))
        tgt_in = randint(V, (B, T))
        tgt_out = randint(V, (B, T))

        def loss_fn():
            logits = model(src, tgt_in)
            return F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1),
                                   label_smoothing=0.1)
        return model, loss_fn
    if a.model == "lm":
        model = LM(a).to(device)
        tokens = randint(V, (B, T))
        targets = randint(V, (B, T))

        def loss_fn():
            logits = model(tokens)
            return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1),
                                   label_smoothing=0.1)
        return model, loss_fn
    raise ValueError(a.model)


def main():
    ap = argparse.ArgumentParser(description="PyTorch training-step benchmark")
    ap.add_argument("--model", choices=["encoder", "seq2seq", "lm"], default="encoder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-grad", action="store_true",
                    help="encoder: the random input requires grad (its gradient is computed)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # Peak RSS of the interpreter with torch imported, before any model exists: the
    # fixed cost of the framework, to read peak_rss_mb against.
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, loss_fn = build(a)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    times = []
    loss = None
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)

    med = statistics.median(times)
    out = {
        "impl": "pytorch",
        # ATen's dispatched instruction set (ATEN_CPU_CAPABILITY may lower it).
        "isa": torch.backends.cpu.get_cpu_capability().lower(),
        "model": a.model,
        "ms_per_step": med * 1e3,
        "tokens_per_s": a.batch * a.seq / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_rss_mb": base_rss,
        "batch": a.batch,
        "seq": a.seq,
        "d_model": a.d_model,
        "heads": a.heads,
        "d_ff": a.d_ff,
        "layers": a.layers,
        "threads": a.threads,
        "vocab": a.vocab,
        "steps": a.steps,
        "warmup": a.warmup,
        "input_grad": a.input_grad,
        "min_ms": min(times) * 1e3,
        "final_loss": loss.item() if loss is not None else None,
        "torch_version": torch.__version__,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
