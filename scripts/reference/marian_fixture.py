#!/usr/bin/env python3
"""Reference for `qkv export --format hf`: the golden post-LN seq2seq fixture
(tests/fixtures/seq2seq_post.safetensors, computed with PyTorch by make_fixtures.py) mapped
onto Hugging Face's MarianMTModel by this script's own code, checked to give PyTorch's
logits through transformers, and saved as tests/fixtures/marian/seq2seq_post.safetensors
(the MarianMT state dict). The Rust test exports the same fixture and compares every tensor.

    PY=$(scripts/venv.sh); "$PY" -m pip install transformers
    "$PY" scripts/reference/marian_fixture.py
"""

import json
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import MarianConfig, MarianMTModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def marian_state(cfg, p):
    """Marian's feature m is qkv's feature perm[m]: sines of every frequency first, then
    cosines (qkv interleaves them)."""
    c = cfg["d_model"]
    perm = np.array([2 * m if m < c // 2 else 2 * (m - c // 2) + 1 for m in range(c)])
    cols = lambda w: np.ascontiguousarray(w[:, perm])  # noqa: E731  (reads the stream)
    rows = lambda w: np.ascontiguousarray(w[perm])  # noqa: E731  (writes the stream)
    out = {}
    vt = cfg["tgt_vocab_size"] or cfg["vocab_size"]
    if cfg["share_embeddings"]:
        out["model.shared.weight"] = cols(p["src_embed.weight"])
    else:
        out["model.encoder.embed_tokens.weight"] = cols(p["src_embed.weight"])
        out["model.decoder.embed_tokens.weight"] = cols(p["tgt_embed.weight"])
    if not (cfg["share_embeddings"] or cfg["tie_output"]):
        out["lm_head.weight"] = cols(p["output.weight"])
    out["final_logits_bias"] = np.zeros((1, vt), dtype=np.float32)

    def norm(to, frm):
        out[to + ".weight"] = rows(p[frm + ".weight"])
        out[to + ".bias"] = rows(p[frm + ".bias"])

    def reads(to, w, b):
        out[to + ".weight"] = cols(w)
        out[to + ".bias"] = b.copy()

    def writes(to, frm):
        out[to + ".weight"] = rows(p[frm + ".weight"])
        out[to + ".bias"] = rows(p[frm + ".bias"])

    for stack, n in (("encoder", cfg["n_encoder_layers"]), ("decoder", cfg["n_decoder_layers"])):
        for i in range(n):
            to, frm = "model.%s.layers.%d" % (stack, i), "%s.layers.%d" % (stack, i)
            w, b = p[frm + ".self_attn.qkv.weight"], p[frm + ".self_attn.qkv.bias"]
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                reads("%s.self_attn.%s" % (to, proj), w[j * c:(j + 1) * c], b[j * c:(j + 1) * c])
            writes(to + ".self_attn.out_proj", frm + ".self_attn.out")
            norm(to + ".self_attn_layer_norm", frm + ".self_attn_norm")
            if stack == "decoder":
                reads(to + ".encoder_attn.q_proj", p[frm + ".cross_attn.q.weight"],
                      p[frm + ".cross_attn.q.bias"])
                w, b = p[frm + ".cross_attn.kv.weight"], p[frm + ".cross_attn.kv.bias"]
                for j, proj in enumerate(("k_proj", "v_proj")):
                    reads("%s.encoder_attn.%s" % (to, proj), w[j * c:(j + 1) * c],
                          b[j * c:(j + 1) * c])
                writes(to + ".encoder_attn.out_proj", frm + ".cross_attn.out")
                norm(to + ".encoder_attn_layer_norm", frm + ".cross_attn_norm")
            reads(to + ".fc1", p[frm + ".ffn.up.weight"], p[frm + ".ffn.up.bias"])
            writes(to + ".fc2", frm + ".ffn.down")
            norm(to + ".final_layer_norm", frm + ".ffn_norm")
    return out


def main():
    path = os.path.join(ROOT, "tests", "fixtures", "seq2seq_post.safetensors")
    with safe_open(path, "np") as f:
        cfg = json.loads(f.metadata()["config"])
    t = load_file(path)
    p = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    state = marian_state(cfg, p)

    vt = cfg["tgt_vocab_size"] or cfg["vocab_size"]
    mc = MarianConfig(
        vocab_size=cfg["vocab_size"], decoder_vocab_size=vt,
        share_encoder_decoder_embeddings=cfg["share_embeddings"],
        tie_word_embeddings=cfg["share_embeddings"] or cfg["tie_output"],
        d_model=cfg["d_model"], encoder_layers=cfg["n_encoder_layers"],
        decoder_layers=cfg["n_decoder_layers"], encoder_attention_heads=cfg["n_heads"],
        decoder_attention_heads=cfg["n_heads"], encoder_ffn_dim=cfg["d_ff"],
        decoder_ffn_dim=cfg["d_ff"], activation_function=cfg["activation"],
        max_position_embeddings=cfg["max_len"], scale_embedding=cfg["scale_embeddings"],
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=cfg["pad_id"], eos_token_id=2, decoder_start_token_id=1,
        forced_eos_token_id=2)
    model = MarianMTModel(mc).eval()
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                   strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    if mc.tie_word_embeddings:
        model.tie_weights()
    # Every Marian parameter came from the fixture, or is one Marian ties or computes.
    loaded = set(state)
    for name, _ in model.named_parameters():
        assert name in loaded or name.endswith("embed_positions.weight") or name in (
            "lm_head.weight", "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight"), name

    pad = cfg["pad_id"]
    src, tgt_in = torch.from_numpy(t["input.src"]), torch.from_numpy(t["input.tgt_in"])
    with torch.no_grad():
        logits = model(input_ids=src, attention_mask=(src != pad).long(),
                       decoder_input_ids=tgt_in,
                       decoder_attention_mask=(tgt_in != pad).long()).logits.numpy()
    want = t["output.logits"]
    keep = (t["input.tgt_in"] != pad)[..., None]
    err = np.abs(np.where(keep, logits - want, 0)).max() / np.abs(want).max()
    print("MarianMT logits against PyTorch's fixture: relative error %.2e" % err)
    assert err < 1e-5, "the mapping is wrong"

    out = os.path.join(ROOT, "tests", "fixtures", "marian")
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, "seq2seq_post.safetensors"))
    print("wrote", os.path.join(out, "seq2seq_post.safetensors"), len(state), "tensors")


if __name__ == "__main__":
    main()
