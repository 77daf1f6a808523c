#!/usr/bin/env python3
"""PyTorch reference trainer for qkv's translation task: same architecture, same tokenizer,
same batches (qkv's length buckets and shuffles, reimplemented bit for bit), same schedule,
optimizer, label smoothing and dropout rate. It writes a qkv model directory, so the test set
is decoded by the same beam search (`qkv eval`) and only training differs.

Run from the repository root after the qkv job (it reuses that run's tokenizer and config):

    cargo run --release -p qkv-cli -- train --config configs/translate-en-es.json
    PY=$(scripts/venv.sh)
    "$PY" scripts/reference/train_translate_torch.py --config configs/translate-en-es.json \
        --qkv-run runs/translate-en-es --out runs/translate-en-es-torch [--max-steps N] [--time-limit S]
    target/release/qkv eval --model runs/translate-en-es-torch --data data/translate-en-es/test.tsv.gz --beam 4
"""

import argparse
import gzip
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer

M64 = (1 << 64) - 1


def splitmix(seed, index):
    """qkv::rng::hash."""
    z = (seed + index * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class Rng:
    """qkv::rng::Rng (next_u64, below)."""

    def __init__(self, seed):
        self.seed, self.counter = seed, 0

    def below(self, n):
        self.counter += 1
        return (splitmix(self.seed, self.counter) * n) >> 64


def shuffle(v, rng):
    for i in range(len(v) - 1, 0, -1):
        j = rng.below(i + 1)
        v[i], v[j] = v[j], v[i]


def batches_by_tokens(lengths, max_tokens, seed, epoch):
    """qkv::data::batches_by_tokens."""
    rng = Rng(splitmix(seed, epoch))
    order = list(range(len(lengths)))
    shuffle(order, rng)
    order.sort(key=lambda i: lengths[i])  # stable, as Rust's sort_by_key
    batches, cur, longest = [], [], 0
    for i in order:
        n = max(lengths[i], 1)
        new_longest = max(longest, n)
        if cur and (len(cur) + 1) * new_longest > max_tokens:
            batches.append(cur)
            cur, longest = [], n
        else:
            longest = new_longest
        cur.append(i)
    if cur:
        batches.append(cur)
    shuffle(batches, rng)
    return batches


def read_pairs(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        out = []
        for line in f:
            line = line.rstrip("\n").rstrip("\r")
            if line.strip():
                s, t = line.split("\t")
                out.append((s.strip(), t.strip()))
    return out


def make_batch(pairs, pad, bos, eos):
    src = [s + [eos] for s, _ in pairs]
    tin = [[bos] + t for _, t in pairs]
    tout = [t + [eos] for _, t in pairs]

    def pad_rows(rows):
        T = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (T - len(r)) for r in rows], dtype=torch.long)

    return pad_rows(src), pad_rows(tin), pad_rows(tout)


def sinusoidal(T, C):
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, C, 2, dtype=torch.float64)
    ang = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), two_i / C)
    P = torch.zeros(T, C, dtype=torch.float64)
    P[:, 0::2], P[:, 1::2] = torch.sin(ang), torch.cos(ang)
    return P.float()


class Model(torch.nn.Module):
    """qkv's Seq2Seq in qkv's parameter names (pre- or post-LN, shared/tied embeddings)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, Fd, V = cfg["d_model"], cfg["d_ff"], cfg["vocab_size"]
        Vt = cfg["tgt_vocab_size"] or V
        self.p = torch.nn.ParameterDict()
        self.names = {}

        def add(name, shape, init):
            t = torch.empty(*shape)
            if init == "zeros":
                t.zero_()
            elif init == "ones":
                t.fill_(1.0)
            elif init == "embed":
                t.normal_(0.0, C ** -0.5)
            else:  # xavier uniform, as qkv's Linear
                a = math.sqrt(6.0 / (shape[0] + shape[1]))
                t.uniform_(-a, a)
            key = name.replace(".", "__")
            self.p[key] = torch.nn.Parameter(t)
            self.names[name] = key

        def linear(name, i, o):
            add(name + ".weight", (o, i), "xavier")
            add(name + ".bias", (o,), "zeros")

        def norm(name):
            add(name + ".weight", (C,), "ones")
            add(name + ".bias", (C,), "zeros")

        add("src_embed.weight", (V, C), "embed")
        if not cfg["share_embeddings"]:
            add("tgt_embed.weight", (Vt, C), "embed")
        for i in range(cfg["n_encoder_layers"]):
            pre = f"encoder.layers.{i}"
            linear(pre + ".self_attn.qkv", C, 3 * C)
            linear(pre + ".self_attn.out", C, C)
            norm(pre + ".self_attn_norm")
            linear(pre + ".ffn.up", C, Fd)
            linear(pre + ".ffn.down", Fd, C)
            norm(pre + ".ffn_norm")
        for i in range(cfg["n_decoder_layers"]):
            pre = f"decoder.layers.{i}"
            linear(pre + ".self_attn.qkv", C, 3 * C)
            linear(pre + ".self_attn.out", C, C)
            norm(pre + ".self_attn_norm")
            linear(pre + ".cross_attn.q", C, C)
            linear(pre + ".cross_attn.kv", C, 2 * C)
            linear(pre + ".cross_attn.out", C, C)
            norm(pre + ".cross_attn_norm")
            linear(pre + ".ffn.up", C, Fd)
            linear(pre + ".ffn.down", Fd, C)
            norm(pre + ".ffn_norm")
        if cfg["norm"] == "pre":
            norm("encoder.final_norm")
            norm("decoder.final_norm")
        if not (cfg["share_embeddings"] or cfg["tie_output"]):
            add("output.weight", (Vt, C), "embed")
        self.register_buffer("pe", sinusoidal(cfg["max_len"], C), persistent=False)

    def w(self, name):
        return self.p[self.names[name]]

    def state(self):
        return {n: self.p[k].detach().contiguous() for n, k in self.names.items()}

    def drop(self, x):
        return F.dropout(x, self.cfg["dropout"], self.training)

    def embed(self, ids, table):
        C = self.cfg["d_model"]
        h = F.embedding(ids, self.w(table)) * (math.sqrt(C) if self.cfg["scale_embeddings"] else 1.0)
        return self.drop(h + self.pe[: ids.shape[1]])

    def lin(self, name, x):
        return F.linear(x, self.w(name + ".weight"), self.w(name + ".bias"))

    def ln(self, name, x):
        return F.layer_norm(x, (x.shape[-1],), self.w(name + ".weight"), self.w(name + ".bias"), self.cfg["layer_norm_eps"])

    def attend(self, q, k, v, key_pad, causal):
        B, Tq, C = q.shape
        H = self.cfg["n_heads"]
        D = C // H
        q = q.view(B, Tq, H, D).transpose(1, 2)
        k = k.view(B, -1, H, D).transpose(1, 2)
        v = v.view(B, -1, H, D).transpose(1, 2)
        mask = ~key_pad[:, None, None, :]
        if causal:
            mask = mask & torch.ones(Tq, k.shape[2], dtype=torch.bool).tril()[None, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, Tq, C)

    def sub(self, norm, x, fn):
        if self.cfg["norm"] == "post":
            return self.ln(norm, x + self.drop(fn(x)))
        return x + self.drop(fn(self.ln(norm, x)))

    def self_attn(self, pre, x, pad, causal):
        C = self.cfg["d_model"]
        qkv = self.lin(pre + ".qkv", x)
        return self.lin(pre + ".out", self.attend(qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:], pad, causal))

    def ffn(self, pre, x):
        h = self.lin(pre + ".up", x)
        h = F.relu(h) if self.cfg["activation"] == "relu" else F.gelu(h)
        return self.lin(pre + ".down", h)

    def forward(self, src, tin, pad_id):
        cfg, C = self.cfg, self.cfg["d_model"]
        src_pad, tgt_pad = src == pad_id, tin == pad_id
        x = self.embed(src, "src_embed.weight")
        for i in range(cfg["n_encoder_layers"]):
            pre = f"encoder.layers.{i}"
            x = self.sub(pre + ".self_attn_norm", x, lambda h: self.self_attn(pre + ".self_attn", h, src_pad, False))
            x = self.sub(pre + ".ffn_norm", x, lambda h: self.ffn(pre + ".ffn", h))
        if cfg["norm"] == "pre":
            x = self.ln("encoder.final_norm", x)
        mem = x
        tgt_table = "src_embed.weight" if cfg["share_embeddings"] else "tgt_embed.weight"
        y = self.embed(tin, tgt_table)
        for i in range(cfg["n_decoder_layers"]):
            pre = f"decoder.layers.{i}"
            y = self.sub(pre + ".self_attn_norm", y, lambda h: self.self_attn(pre + ".self_attn", h, tgt_pad, True))

            def cross(h, pre=pre):
                q = self.lin(pre + ".cross_attn.q", h)
                kv = self.lin(pre + ".cross_attn.kv", mem)
                return self.lin(pre + ".cross_attn.out", self.attend(q, kv[..., :C], kv[..., C:], src_pad, False))

            y = self.sub(pre + ".cross_attn_norm", y, cross)
            y = self.sub(pre + ".ffn_norm", y, lambda h: self.ffn(pre + ".ffn", h))
        if cfg["norm"] == "pre":
            y = self.ln("decoder.final_norm", y)
        out = tgt_table if (cfg["share_embeddings"] or cfg["tie_output"]) else "output.weight"
        return y @ self.w(out).t()


def save_dir(model, a, out):
    """A qkv model directory: weights under qkv's names, the qkv run's config and tokenizer."""
    os.makedirs(out, exist_ok=True)
    save_file(model.state(), os.path.join(out, "model.safetensors"))
    shutil.copy(os.path.join(a.qkv_run, "best", "config.json"), os.path.join(out, "config.json"))
    shutil.copy(os.path.join(a.qkv_run, "tokenizer.json"), os.path.join(out, "tokenizer.json"))


def lr_at(s, step):
    step = max(step, 1)
    if s["kind"] == "constant":
        return s["lr"]
    if s["kind"] == "inverse_sqrt":
        w = max(s["warmup"], 1)
        return s["peak"] * min(step / w, math.sqrt(w / step))
    if step <= s["warmup"]:
        return s["peak"] * step / max(s["warmup"], 1)
    prog = min((step - s["warmup"]) / max(s["total"] - s["warmup"], 1), 1.0)
    return s["min"] + 0.5 * (s["peak"] - s["min"]) * (1 + math.cos(math.pi * prog))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--qkv-run", required=True, help="the qkv run directory (tokenizer, config)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--time-limit", type=float, help="stop after this many training seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--snapshot-at", type=float, help="also save the model as OUT-at-<S>s after S training seconds (equal wall-clock comparison)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    job = json.load(open(a.config))
    base = os.path.dirname(a.config)
    tr = job["train"]
    steps = a.max_steps or tr["max_steps"]
    cfg = json.load(open(os.path.join(a.qkv_run, "best", "config.json")))
    tok = Tokenizer.from_file(os.path.join(a.qkv_run, "tokenizer.json"))
    pad, bos, eos = (tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>"))
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    pairs = []
    for s, t in read_pairs(os.path.join(base, job["data"]["train"])):
        s, t = enc(s), enc(t)
        if len(s) + 1 <= cfg["max_len"] and len(t) + 1 <= cfg["max_len"]:
            pairs.append((s, t))
    lengths = [max(len(s), len(t)) + 1 for s, t in pairs]
    torch.manual_seed(tr["seed"])
    model = Model(cfg)
    o = tr["optimizer"]
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(o["beta1"], o["beta2"]), eps=o["eps"], weight_decay=o["weight_decay"])
    epoch, batches, bi, t0 = 0, None, 0, time.time()
    snap_done = False
    log = []
    model.train()
    for step in range(1, steps + 1):
        if a.time_limit and time.time() - t0 >= a.time_limit:
            break
        if batches is None or bi >= len(batches):
            if batches is not None:
                epoch += 1
            batches, bi = batches_by_tokens(lengths, tr["max_tokens"], tr["seed"], epoch), 0
        src, tin, tout = make_batch([pairs[i] for i in batches[bi]], pad, bos, eos)
        bi += 1
        logits = model(src, tin, pad)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tout.reshape(-1), ignore_index=pad, label_smoothing=tr["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o["clip_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"])
        for g in opt.param_groups:
            g["lr"] = lr_at(tr["schedule"], step)
        opt.step()
        log.append((step, loss.item(), time.time() - t0))
        if a.snapshot_at and not snap_done and time.time() - t0 >= a.snapshot_at:
            save_dir(model, a, f"{a.out}-at-{int(a.snapshot_at)}s")
            print(f"snapshot at step {step}, {time.time() - t0:.1f} s", flush=True)
            snap_done = True
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.1f} s", flush=True)
    train_s = time.time() - t0
    save_dir(model, a, a.out)
    with open(os.path.join(a.out, "torch_train.csv"), "w") as f:
        f.write("step,loss,elapsed_s\n")
        for s, l, e in log:
            f.write(f"{s},{l:.6f},{e:.2f}\n")
    print(json.dumps({"steps": log[-1][0] if log else 0, "train_s": round(train_s, 1), "s_per_step": round(train_s / max(len(log), 1), 4)}))


if __name__ == "__main__":
    main()
