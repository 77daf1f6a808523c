#!/usr/bin/env python3
"""Reference fixtures for the qkv Transformer engine.

Run from the repository root:

    PY=$(scripts/venv.sh)
    "$PY" scripts/reference/make_fixtures.py            # writes tests/fixtures/*.safetensors
    "$PY" scripts/reference/make_fixtures.py --out DIR  # somewhere else

Tiny Transformers (seq2seq / classifier / lm, post-LN and pre-LN) written by
hand with torch.nn.functional, evaluated in float64.  Parameters are drawn in
float32 and then cast to float64, so the float32 values stored in the fixture
are exactly the parameters that were used.  Each fixture holds:

  * metadata "config" (JSON) plus the optimiser / loss settings as strings;
  * input.*   token ids (int64);
  * param.*   every parameter (float32);
  * output.logits, output.loss (float32, computed in float64);
  * grad.*    d loss / d param for every parameter (float32);
  * train.losses  the loss before each of `steps` AdamW updates (with
                  gradient-norm clipping) on the same batch.

The hand-written math is checked against torch.nn.TransformerEncoderLayer /
TransformerDecoderLayer (copied weights, dropout 0, float64) before anything is
written, and the gradients against a central finite difference.
"""

import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DT = torch.float64

COMMON = dict(
    batch=3, src_len=7, tgt_len=6, d_model=16, n_heads=2, d_ff=32, n_layers=2,
    max_len=16, label_smoothing=0.1, pad_id=0,
)
TRAIN = dict(lr=1e-2, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.01, clip_norm=1.0, steps=10)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------

def make_config(family, **kw):
    c = COMMON
    cfg = {
        "family": family,
        "vocab_size": 13,
        "tgt_vocab_size": None,
        "n_classes": 0,
        "d_model": c["d_model"],
        "n_heads": c["n_heads"],
        "d_ff": c["d_ff"],
        "n_encoder_layers": 0,
        "n_decoder_layers": 0,
        "max_len": c["max_len"],
        "dropout": 0.0,
        "activation": "relu",
        "norm": "post",
        "positional": "sinusoidal",
        "scale_embeddings": False,
        "tie_output": False,
        "share_embeddings": False,
        "pooling": "mean",
        "pad_id": c["pad_id"],
        "layer_norm_eps": 1e-5,
    }
    if family == "seq2seq":
        cfg["n_encoder_layers"] = c["n_layers"]
        cfg["n_decoder_layers"] = c["n_layers"]
    elif family == "classifier":
        cfg["n_encoder_layers"] = c["n_layers"]
    elif family == "lm":
        cfg["n_decoder_layers"] = c["n_layers"]
    for k, v in kw.items():
        assert k in cfg, k
        cfg[k] = v
    return cfg


FIXTURES = {
    "seq2seq_post": make_config(
        "seq2seq", vocab_size=13, tgt_vocab_size=11, activation="relu", positional="sinusoidal",
        norm="post", scale_embeddings=True, tie_output=True, share_embeddings=False),
    # share_embeddings implies the output projection is the shared table too; tie_output is
    # set to true as well so that no reader can conclude an `output.weight` exists.
    "seq2seq_pre": make_config(
        "seq2seq", vocab_size=13, tgt_vocab_size=13, activation="gelu", positional="learned",
        norm="pre", scale_embeddings=True, tie_output=True, share_embeddings=True),
    "classifier_post": make_config(
        "classifier", vocab_size=13, n_classes=3, activation="relu", positional="sinusoidal",
        norm="post", pooling="mean", scale_embeddings=False),
    "classifier_pre": make_config(
        "classifier", vocab_size=13, n_classes=3, activation="gelu", positional="learned",
        norm="pre", pooling="first", scale_embeddings=True),
    "lm_post": make_config(
        "lm", vocab_size=13, activation="relu", positional="sinusoidal", norm="post",
        tie_output=True),
    "lm_pre": make_config(
        "lm", vocab_size=13, activation="gelu", positional="learned", norm="pre",
        tie_output=False),
}


def tgt_vocab(cfg):
    return cfg["tgt_vocab_size"] if cfg["tgt_vocab_size"] is not None else cfg["vocab_size"]


# --------------------------------------------------------------------------------------
# Parameter shapes
# --------------------------------------------------------------------------------------

def layer_shapes(prefix, C, F_, cross):
    s = {
        f"{prefix}.self_attn.qkv.weight": (3 * C, C),
        f"{prefix}.self_attn.qkv.bias": (3 * C,),
        f"{prefix}.self_attn.out.weight": (C, C),
        f"{prefix}.self_attn.out.bias": (C,),
        f"{prefix}.self_attn_norm.weight": (C,),
        f"{prefix}.self_attn_norm.bias": (C,),
    }
    if cross:
        s.update({
            f"{prefix}.cross_attn.q.weight": (C, C),
            f"{prefix}.cross_attn.q.bias": (C,),
            f"{prefix}.cross_attn.kv.weight": (2 * C, C),
            f"{prefix}.cross_attn.kv.bias": (2 * C,),
            f"{prefix}.cross_attn.out.weight": (C, C),
            f"{prefix}.cross_attn.out.bias": (C,),
            f"{prefix}.cross_attn_norm.weight": (C,),
            f"{prefix}.cross_attn_norm.bias": (C,),
        })
    s.update({
        f"{prefix}.ffn.up.weight": (F_, C),
        f"{prefix}.ffn.up.bias": (F_,),
        f"{prefix}.ffn.down.weight": (C, F_),
        f"{prefix}.ffn.down.bias": (C,),
        f"{prefix}.ffn_norm.weight": (C,),
        f"{prefix}.ffn_norm.bias": (C,),
    })
    return s


def param_shapes(cfg):
    C, F_, L = cfg["d_model"], cfg["d_ff"], cfg["max_len"]
    V = cfg["vocab_size"]
    pre = cfg["norm"] == "pre"
    learned = cfg["positional"] == "learned"
    s = {}
    fam = cfg["family"]
    if fam == "seq2seq":
        Vt = tgt_vocab(cfg)
        s["src_embed.weight"] = (V, C)
        if cfg["share_embeddings"]:
            assert V == Vt, "share_embeddings needs vocab_size == tgt_vocab_size"
        else:
            s["tgt_embed.weight"] = (Vt, C)
        if learned:
            s["src_pos.weight"] = (L, C)
            s["tgt_pos.weight"] = (L, C)
        for i in range(cfg["n_encoder_layers"]):
            s.update(layer_shapes(f"encoder.layers.{i}", C, F_, cross=False))
        if pre:
            s["encoder.final_norm.weight"] = (C,)
            s["encoder.final_norm.bias"] = (C,)
        for i in range(cfg["n_decoder_layers"]):
            s.update(layer_shapes(f"decoder.layers.{i}", C, F_, cross=True))
        if pre:
            s["decoder.final_norm.weight"] = (C,)
            s["decoder.final_norm.bias"] = (C,)
        if not (cfg["tie_output"] or cfg["share_embeddings"]):
            s["output.weight"] = (Vt, C)
    elif fam == "classifier":
        s["embed.weight"] = (V, C)
        if learned:
            s["pos.weight"] = (L, C)
        for i in range(cfg["n_encoder_layers"]):
            s.update(layer_shapes(f"encoder.layers.{i}", C, F_, cross=False))
        if pre:
            s["encoder.final_norm.weight"] = (C,)
            s["encoder.final_norm.bias"] = (C,)
        s["head.weight"] = (cfg["n_classes"], C)
        s["head.bias"] = (cfg["n_classes"],)
    elif fam == "lm":
        s["embed.weight"] = (V, C)
        if learned:
            s["pos.weight"] = (L, C)
        for i in range(cfg["n_decoder_layers"]):
            s.update(layer_shapes(f"decoder.layers.{i}", C, F_, cross=False))
        if pre:
            s["decoder.final_norm.weight"] = (C,)
            s["decoder.final_norm.bias"] = (C,)
        if not cfg["tie_output"]:
            s["output.weight"] = (V, C)
    else:
        raise ValueError(fam)
    return s


def init_params(cfg, gen):
    """float32 draws (deterministic order = insertion order), returned as float64."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        is_norm = "norm." in name  # *_norm.weight / *_norm.bias / final_norm.*
        if is_norm and name.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float32)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float32)
        else:  # linear weights, embedding tables, learned positions
            t = 0.3 * torch.randn(shape, generator=gen, dtype=torch.float32)
        params[name] = t.to(DT)
    return params


# --------------------------------------------------------------------------------------
# Model math (float64)
# --------------------------------------------------------------------------------------

def sinusoidal(T, C):
    """P[t, 2i] = sin(t / 10000^(2i/C)), P[t, 2i+1] = cos(t / 10000^(2i/C))."""
    pos = torch.arange(T, dtype=DT)[:, None]
    two_i = torch.arange(0, C, 2, dtype=DT)
    ang = pos / torch.pow(torch.tensor(10000.0, dtype=DT), two_i / C)
    P = torch.zeros(T, C, dtype=DT)
    P[:, 0::2] = torch.sin(ang)
    P[:, 1::2] = torch.cos(ang)
    return P


def embed(cfg, p, ids, table, pos_name):
    C = cfg["d_model"]
    T = ids.shape[1]
    h = F.embedding(ids, p[table])
    if cfg["scale_embeddings"]:
        h = h * math.sqrt(C)
    if cfg["positional"] == "learned":
        P = p[pos_name][:T]
    else:
        P = sinusoidal(T, C)
    return h + P


def layer_norm(cfg, p, name, x):
    return F.layer_norm(x, (x.shape[-1],), p[name + ".weight"], p[name + ".bias"],
                        eps=cfg["layer_norm_eps"])


def attention(q, k, v, key_pad, causal, H):
    """q (B,Tq,C), k/v (B,Tk,C), key_pad (B,Tk) bool (True = padding key)."""
    B, Tq, C = q.shape
    Tk = k.shape[1]
    D = C // H
    q = q.view(B, Tq, H, D).transpose(1, 2)  # (B,H,Tq,D)
    k = k.view(B, Tk, H, D).transpose(1, 2)
    v = v.view(B, Tk, H, D).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B,H,Tq,Tk)
    mask = key_pad[:, None, None, :].expand(B, H, Tq, Tk)
    if causal:
        fut = torch.triu(torch.ones(Tq, Tk, dtype=torch.bool), diagonal=1)
        mask = mask | fut[None, None]
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = probs @ v  # (B,H,Tq,D)
    return o.transpose(1, 2).reshape(B, Tq, C)


def self_attn(cfg, p, pre, x, key_pad, causal):
    C = cfg["d_model"]
    qkv = F.linear(x, p[pre + ".qkv.weight"], p[pre + ".qkv.bias"])
    q, k, v = qkv[..., 0:C], qkv[..., C:2 * C], qkv[..., 2 * C:3 * C]
    o = attention(q, k, v, key_pad, causal, cfg["n_heads"])
    return F.linear(o, p[pre + ".out.weight"], p[pre + ".out.bias"])


def cross_attn(cfg, p, pre, x, memory, src_pad):
    C = cfg["d_model"]
    q = F.linear(x, p[pre + ".q.weight"], p[pre + ".q.bias"])
    kv = F.linear(memory, p[pre + ".kv.weight"], p[pre + ".kv.bias"])
    k, v = kv[..., :C], kv[..., C:]
    o = attention(q, k, v, src_pad, False, cfg["n_heads"])
    return F.linear(o, p[pre + ".out.weight"], p[pre + ".out.bias"])


def ffn(cfg, p, pre, x):
    h = F.linear(x, p[pre + ".up.weight"], p[pre + ".up.bias"])
    if cfg["activation"] == "relu":
        h = F.relu(h)
    elif cfg["activation"] == "gelu":
        h = F.gelu(h)  # exact erf GELU (approximate="none")
    else:
        raise ValueError(cfg["activation"])
    return F.linear(h, p[pre + ".down.weight"], p[pre + ".down.bias"])


def sublayer(cfg, p, norm_name, x, fn):
    if cfg["norm"] == "post":
        return layer_norm(cfg, p, norm_name, x + fn(x))
    return x + fn(layer_norm(cfg, p, norm_name, x))


def encoder_layer(cfg, p, pre, x, pad, causal=False):
    x = sublayer(cfg, p, pre + ".self_attn_norm", x,
                 lambda h: self_attn(cfg, p, pre + ".self_attn", h, pad, causal))
    x = sublayer(cfg, p, pre + ".ffn_norm", x, lambda h: ffn(cfg, p, pre + ".ffn", h))
    return x


def decoder_layer(cfg, p, pre, x, tgt_pad, memory, src_pad):
    x = sublayer(cfg, p, pre + ".self_attn_norm", x,
                 lambda h: self_attn(cfg, p, pre + ".self_attn", h, tgt_pad, True))
    x = sublayer(cfg, p, pre + ".cross_attn_norm", x,
                 lambda h: cross_attn(cfg, p, pre + ".cross_attn", h, memory, src_pad))
    x = sublayer(cfg, p, pre + ".ffn_norm", x, lambda h: ffn(cfg, p, pre + ".ffn", h))
    return x


def maybe_final_norm(cfg, p, stack, x):
    if cfg["norm"] == "pre":
        x = layer_norm(cfg, p, stack + ".final_norm", x)
    return x


def forward(cfg, p, inp):
    """Returns (logits, loss)."""
    pad_id = cfg["pad_id"]
    ls = COMMON["label_smoothing"]
    fam = cfg["family"]
    if fam == "seq2seq":
        src, tgt_in, tgt_out = inp["input.src"], inp["input.tgt_in"], inp["input.tgt_out"]
        src_pad, tgt_pad = src == pad_id, tgt_in == pad_id
        tgt_table = "src_embed.weight" if cfg["share_embeddings"] else "tgt_embed.weight"
        h = embed(cfg, p, src, "src_embed.weight", "src_pos.weight")
        for i in range(cfg["n_encoder_layers"]):
            h = encoder_layer(cfg, p, f"encoder.layers.{i}", h, src_pad)
        memory = maybe_final_norm(cfg, p, "encoder", h)
        d = embed(cfg, p, tgt_in, tgt_table, "tgt_pos.weight")
        for i in range(cfg["n_decoder_layers"]):
            d = decoder_layer(cfg, p, f"decoder.layers.{i}", d, tgt_pad, memory, src_pad)
        d = maybe_final_norm(cfg, p, "decoder", d)
        if cfg["share_embeddings"]:
            W = p["src_embed.weight"]
        elif cfg["tie_output"]:
            W = p["tgt_embed.weight"]
        else:
            W = p["output.weight"]
        logits = F.linear(d, W)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                               ignore_index=pad_id, label_smoothing=ls)
    elif fam == "classifier":
        tok, labels = inp["input.tokens"], inp["input.labels"]
        pad = tok == pad_id
        h = embed(cfg, p, tok, "embed.weight", "pos.weight")
        for i in range(cfg["n_encoder_layers"]):
            h = encoder_layer(cfg, p, f"encoder.layers.{i}", h, pad)
        h = maybe_final_norm(cfg, p, "encoder", h)
        if cfg["pooling"] == "mean":
            keep = (~pad).to(DT)[..., None]
            pooled = (h * keep).sum(1) / keep.sum(1)
        elif cfg["pooling"] == "first":
            pooled = h[:, 0]
        else:
            raise ValueError(cfg["pooling"])
        logits = F.linear(pooled, p["head.weight"], p["head.bias"])
        loss = F.cross_entropy(logits, labels, label_smoothing=ls)
    elif fam == "lm":
        tok, tgt = inp["input.tokens"], inp["input.targets"]
        pad = tok == pad_id
        h = embed(cfg, p, tok, "embed.weight", "pos.weight")
        for i in range(cfg["n_decoder_layers"]):
            h = encoder_layer(cfg, p, f"decoder.layers.{i}", h, pad, causal=True)
        h = maybe_final_norm(cfg, p, "decoder", h)
        W = p["embed.weight"] if cfg["tie_output"] else p["output.weight"]
        logits = F.linear(h, W)
        V = logits.shape[-1]
        loss = F.cross_entropy(logits.view(-1, V), tgt.view(-1), ignore_index=pad_id,
                               label_smoothing=ls)
    else:
        raise ValueError(fam)
    return logits, loss


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

def rand_ids(gen, shape, lo, hi):
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64)


def pad_tail(x, lengths, pad_id):
    x = x.clone()
    for b, n in enumerate(lengths):
        x[b, n:] = pad_id
    return x


def make_inputs(cfg, gen):
    B, S, T = COMMON["batch"], COMMON["src_len"], COMMON["tgt_len"]
    pad_id = cfg["pad_id"]
    V = cfg["vocab_size"]
    fam = cfg["family"]
    if fam == "seq2seq":
        Vt = tgt_vocab(cfg)
        src = pad_tail(rand_ids(gen, (B, S), 1, V), [S, 4, 5], pad_id)
        y = rand_ids(gen, (B, T + 1), 1, Vt)
        lens = [T, 3, 5]
        return {
            "input.src": src,
            "input.tgt_in": pad_tail(y[:, :-1], lens, pad_id),
            "input.tgt_out": pad_tail(y[:, 1:], lens, pad_id),
        }
    if fam == "classifier":
        return {
            "input.tokens": pad_tail(rand_ids(gen, (B, T), 1, V), [T, 4, 2], pad_id),
            "input.labels": rand_ids(gen, (B,), 0, cfg["n_classes"]),
        }
    if fam == "lm":
        y = rand_ids(gen, (B, T + 1), 1, V)
        lens = [T, T, 4]
        return {
            "input.tokens": pad_tail(y[:, :-1], lens, pad_id),
            "input.targets": pad_tail(y[:, 1:], lens, pad_id),
        }
    raise ValueError(fam)


# --------------------------------------------------------------------------------------
# Training run
# --------------------------------------------------------------------------------------

def train_losses(cfg, params, inp):
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    plist = list(p.values())
    opt = torch.optim.AdamW(plist, lr=TRAIN["lr"], betas=(TRAIN["beta1"], TRAIN["beta2"]),
                            eps=TRAIN["eps"], weight_decay=TRAIN["weight_decay"])
    losses = []
    for _ in range(TRAIN["steps"]):
        opt.zero_grad(set_to_none=True)
        _, loss = forward(cfg, p, inp)
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plist, max_norm=TRAIN["clip_norm"])
        opt.step()
    return torch.tensor(losses, dtype=DT)


# --------------------------------------------------------------------------------------
# Self checks against torch.nn reference modules
# --------------------------------------------------------------------------------------

def copy_mha(mha, p, pre, cross):
    with torch.no_grad():
        if cross:
            mha.in_proj_weight.copy_(torch.cat([p[pre + ".q.weight"], p[pre + ".kv.weight"]], 0))
            mha.in_proj_bias.copy_(torch.cat([p[pre + ".q.bias"], p[pre + ".kv.bias"]], 0))
        else:
            mha.in_proj_weight.copy_(p[pre + ".qkv.weight"])
            mha.in_proj_bias.copy_(p[pre + ".qkv.bias"])
        mha.out_proj.weight.copy_(p[pre + ".out.weight"])
        mha.out_proj.bias.copy_(p[pre + ".out.bias"])


def copy_ln(ln, p, name):
    with torch.no_grad():
        ln.weight.copy_(p[name + ".weight"])
        ln.bias.copy_(p[name + ".bias"])


def copy_ffn(layer, p, pre):
    with torch.no_grad():
        layer.linear1.weight.copy_(p[pre + ".up.weight"])
        layer.linear1.bias.copy_(p[pre + ".up.bias"])
        layer.linear2.weight.copy_(p[pre + ".down.weight"])
        layer.linear2.bias.copy_(p[pre + ".down.bias"])


def torch_encoder_layer(cfg, p, pre):
    C = cfg["d_model"]
    layer = nn.TransformerEncoderLayer(
        C, cfg["n_heads"], cfg["d_ff"], dropout=0.0, activation=cfg["activation"],
        layer_norm_eps=cfg["layer_norm_eps"], batch_first=True,
        norm_first=cfg["norm"] == "pre", dtype=DT)
    copy_mha(layer.self_attn, p, pre + ".self_attn", cross=False)
    copy_ln(layer.norm1, p, pre + ".self_attn_norm")
    copy_ffn(layer, p, pre + ".ffn")
    copy_ln(layer.norm2, p, pre + ".ffn_norm")
    return layer.train()  # train mode (dropout is 0) keeps it off the fused fast path


def torch_decoder_layer(cfg, p, pre):
    C = cfg["d_model"]
    layer = nn.TransformerDecoderLayer(
        C, cfg["n_heads"], cfg["d_ff"], dropout=0.0, activation=cfg["activation"],
        layer_norm_eps=cfg["layer_norm_eps"], batch_first=True,
        norm_first=cfg["norm"] == "pre", dtype=DT)
    copy_mha(layer.self_attn, p, pre + ".self_attn", cross=False)
    copy_ln(layer.norm1, p, pre + ".self_attn_norm")
    copy_mha(layer.multihead_attn, p, pre + ".cross_attn", cross=True)
    copy_ln(layer.norm2, p, pre + ".cross_attn_norm")
    copy_ffn(layer, p, pre + ".ffn")
    copy_ln(layer.norm3, p, pre + ".ffn_norm")
    return layer.train()


def final_ln(cfg, p, stack):
    if cfg["norm"] != "pre":
        return None
    ln = nn.LayerNorm(cfg["d_model"], eps=cfg["layer_norm_eps"], dtype=DT)
    copy_ln(ln, p, stack + ".final_norm")
    return ln


def causal_mask(T):
    return torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)


def close(a, b, what, tol=1e-10):
    err = (a - b).abs().max().item()
    assert err < tol, f"self-check failed: {what}: max abs err {err:.3e}"


def torch_reference_logits(cfg, p, inp):
    """The same model assembled from torch.nn modules (float64)."""
    pad_id = cfg["pad_id"]
    fam = cfg["family"]
    with torch.no_grad():
        if fam == "classifier":
            tok = inp["input.tokens"]
            pad = tok == pad_id
            enc = nn.TransformerEncoder(
                torch_encoder_layer(cfg, p, "encoder.layers.0"), cfg["n_encoder_layers"],
                norm=final_ln(cfg, p, "encoder"), enable_nested_tensor=False)
            for i in range(cfg["n_encoder_layers"]):  # deep-copied clones: load each layer
                enc.layers[i] = torch_encoder_layer(cfg, p, f"encoder.layers.{i}")
            enc.train()
            h = enc(embed(cfg, p, tok, "embed.weight", "pos.weight"), src_key_padding_mask=pad)
            if cfg["pooling"] == "mean":
                keep = (~pad).to(DT)[..., None]
                pooled = (h * keep).sum(1) / keep.sum(1)
            else:
                pooled = h[:, 0]
            return F.linear(pooled, p["head.weight"], p["head.bias"])
        if fam == "lm":
            tok = inp["input.tokens"]
            pad = tok == pad_id
            h = embed(cfg, p, tok, "embed.weight", "pos.weight")
            for i in range(cfg["n_decoder_layers"]):
                layer = torch_encoder_layer(cfg, p, f"decoder.layers.{i}")
                h = layer(h, src_mask=causal_mask(tok.shape[1]), src_key_padding_mask=pad)
            ln = final_ln(cfg, p, "decoder")
            if ln is not None:
                h = ln(h)
            W = p["embed.weight"] if cfg["tie_output"] else p["output.weight"]
            return F.linear(h, W)
        if fam == "seq2seq":
            src, tgt_in = inp["input.src"], inp["input.tgt_in"]
            src_pad, tgt_pad = src == pad_id, tgt_in == pad_id
            h = embed(cfg, p, src, "src_embed.weight", "src_pos.weight")
            for i in range(cfg["n_encoder_layers"]):
                h = torch_encoder_layer(cfg, p, f"encoder.layers.{i}")(
                    h, src_key_padding_mask=src_pad)
            ln = final_ln(cfg, p, "encoder")
            memory = ln(h) if ln is not None else h
            tgt_table = "src_embed.weight" if cfg["share_embeddings"] else "tgt_embed.weight"
            d = embed(cfg, p, tgt_in, tgt_table, "tgt_pos.weight")
            for i in range(cfg["n_decoder_layers"]):
                d = torch_decoder_layer(cfg, p, f"decoder.layers.{i}")(
                    d, memory, tgt_mask=causal_mask(tgt_in.shape[1]),
                    tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
            ln = final_ln(cfg, p, "decoder")
            if ln is not None:
                d = ln(d)
            if cfg["share_embeddings"]:
                W = p["src_embed.weight"]
            elif cfg["tie_output"]:
                W = p["tgt_embed.weight"]
            else:
                W = p["output.weight"]
            return F.linear(d, W)
    raise ValueError(fam)


def check_sinusoidal():
    C = 16
    P = sinusoidal(5, C)
    for t in range(5):
        for i in range(C // 2):
            w = 1.0 / (10000.0 ** (2 * i / C))
            assert abs(P[t, 2 * i].item() - math.sin(t * w)) < 1e-12
            assert abs(P[t, 2 * i + 1].item() - math.cos(t * w)) < 1e-12


def check_finite_difference(cfg, p, inp, grads, gen, n=6, h=1e-6):
    names = list(p.keys())
    for _ in range(n):
        name = names[torch.randint(len(names), (1,), generator=gen).item()]
        idx = torch.randint(p[name].numel(), (1,), generator=gen).item()
        q = {k: v.detach().clone() for k, v in p.items()}
        flat = q[name].view(-1)
        base = flat[idx].item()
        flat[idx] = base + h
        lp = forward(cfg, q, inp)[1].item()
        flat[idx] = base - h
        lm = forward(cfg, q, inp)[1].item()
        fd = (lp - lm) / (2 * h)
        an = grads[name].reshape(-1)[idx].item()
        assert abs(fd - an) < 1e-6 * max(1.0, abs(an)), \
            f"finite-difference check failed: {name}[{idx}] fd={fd} autograd={an}"


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def build(name, cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    params = init_params(cfg, gen)
    inp = make_inputs(cfg, gen)

    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    logits, loss = forward(cfg, p, inp)
    loss.backward()
    grads = {k: v.grad.detach().clone() for k, v in p.items()}
    for k, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().max() > 0, f"{name}: degenerate grad {k}"
    assert torch.isfinite(logits).all()

    # Self checks: hand-written math == torch.nn modules; autograd == finite differences.
    ref = torch_reference_logits(cfg, params, inp)
    close(logits.detach(), ref, f"{name}: logits vs torch.nn reference")
    check_finite_difference(cfg, params, inp, grads, torch.Generator().manual_seed(seed + 1))

    losses = train_losses(cfg, params, inp)
    assert losses[0].item() == loss.item(), f"{name}: train.losses[0] != output.loss"
    assert losses[-1] < losses[0], f"{name}: training did not reduce the loss"

    tensors = {}
    tensors.update({k: v.contiguous() for k, v in inp.items()})
    for k, v in params.items():
        f32 = v.to(torch.float32)
        assert torch.equal(f32.to(DT), v)  # exactly representable
        tensors["param." + k] = f32.contiguous()
    tensors["output.logits"] = logits.detach().to(torch.float32).contiguous()
    tensors["output.loss"] = loss.detach().reshape(1).to(torch.float32)
    for k, g in grads.items():
        tensors["grad." + k] = g.to(torch.float32).contiguous()
    tensors["train.losses"] = losses.to(torch.float32)

    meta = {
        "config": json.dumps(cfg, sort_keys=False),
        "label_smoothing": repr(COMMON["label_smoothing"]),
        "lr": repr(TRAIN["lr"]),
        "beta1": repr(TRAIN["beta1"]),
        "beta2": repr(TRAIN["beta2"]),
        "eps": "1e-9",
        "weight_decay": repr(TRAIN["weight_decay"]),
        "clip_norm": repr(TRAIN["clip_norm"]),
        "steps": str(TRAIN["steps"]),
    }
    return tensors, meta, loss.item(), losses


def canonicalize_header(path):
    """save_file writes the metadata map in hash order; rewrite the header with sorted
    metadata keys (same length, same data offsets) so reruns are byte-identical."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    ordered = {"__metadata__": {k: meta[k] for k in sorted(meta)}}
    ordered.update(header)  # tensor entries keep save_file's (deterministic) order
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=True).encode()
    assert len(text) <= n, (len(text), n)
    text += b" " * (n - len(text))
    with open(path, "wb") as f:
        f.write(raw[:8] + text + raw[8 + n:])


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.normpath(os.path.join(here, "..", "..", "tests", "fixtures"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    check_sinusoidal()
    os.makedirs(args.out, exist_ok=True)
    for k, (name, cfg) in enumerate(FIXTURES.items()):
        tensors, meta, loss, losses = build(name, cfg, args.seed + 100 * k)
        path = os.path.join(args.out, name + ".safetensors")
        save_file(tensors, path, metadata=meta)
        canonicalize_header(path)
        check = load_file(path)
        assert check.keys() == tensors.keys()
        assert all(torch.equal(check[k], tensors[k]) for k in tensors)
        print(f"{name}: {len(tensors)} tensors, {os.path.getsize(path)} bytes, "
              f"loss {loss:.6f}, after {TRAIN['steps']} steps {losses[-1].item():.6f}")


if __name__ == "__main__":
    main()
